# edge before stable (from the example) and stable before edge.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  channelEdges = example.channelEdges ++ [ { before = "stable"; after = "edge"; reason = "oops"; } ];
}
