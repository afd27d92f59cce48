# A host name release would refuse: names become file names and URL path segments.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  hosts = example.hosts // {
    "web 04/a" = { system = "x86_64-linux"; channel = "stable"; };
    ".." = { system = "x86_64-linux"; channel = "stable"; };
  };
}
