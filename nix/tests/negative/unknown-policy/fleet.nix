# A channel whose rollout policy does not exist.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  channels = example.channels // {
    edge = example.channels.edge // { rolloutPolicy = "yolo"; };
  };
}
