# A channel edge naming a channel that is not in the fleet.
let
  example = import ../../positive/example/fleet.nix;
in
example // { channelEdges = [ { before = "edge"; after = "production"; } ]; }
