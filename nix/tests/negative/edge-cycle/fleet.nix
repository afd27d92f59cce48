# db-01 before web-02 (from the example), web-02 before web-01, web-01 before db-01:
# nothing could ever go first.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  edges = example.edges ++ [
    { before = "web-02"; after = "web-01"; }
    { before = "web-01"; after = "db-01"; }
  ];
}
