# The same channel and policy defined twice, even identically, is a collision.
{ mergeFleets, ... }:
let
  example = import ../../positive/example/fleet.nix;
in
mergeFleets [
  example
  { inherit (example) channels; }
  { rolloutPolicies = { inherit (example.rolloutPolicies) canary; }; }
]
