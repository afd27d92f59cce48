# A host that must wait for itself.
let
  example = import ../../positive/example/fleet.nix;
in
example // { edges = [ { before = "web-03"; after = "web-03"; } ]; }
