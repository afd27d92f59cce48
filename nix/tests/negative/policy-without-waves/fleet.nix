# A rollout policy with no wave has nowhere to put a host.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  rolloutPolicies = example.rolloutPolicies // {
    all-at-once = example.rolloutPolicies.all-at-once // { waves = [ ]; };
  };
}
