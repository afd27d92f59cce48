# Every problem is reported at once, not only the first, as release does.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  hosts = example.hosts // { lab-02 = { system = "x86_64-linux"; channel = "nightly"; }; };
  channels = example.channels // {
    edge = example.channels.edge // { rolloutPolicy = "fast"; signingIntervalMinutes = 1000; };
  };
  edges = example.edges ++ [ { before = "web-02"; after = "db-01"; } { before = "db-01"; after = "ghost"; } ];
}
