# A host on a channel that no one defined.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  hosts = example.hosts // {
    web-04 = { system = "x86_64-linux"; tags = [ "web" ]; channel = "stabel"; };
  };
}
