# Two teams both declare web-01: merging must not silently pick one.
{ mergeFleets, ... }:
let
  example = import ../../positive/example/fleet.nix;
in
mergeFleets [
  example
  { hosts.db-03 = { system = "x86_64-linux"; tags = [ "db" ]; channel = "stable"; }; }
  { hosts.web-01 = { system = "aarch64-linux"; channel = "edge"; }; }
]
