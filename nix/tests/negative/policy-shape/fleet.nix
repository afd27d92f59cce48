# Policy and channel values release would not read: an unknown onHealthFailure, a
# negative soak and a fractional interval.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  channels = example.channels // {
    edge = example.channels.edge // { reconcileIntervalMinutes = 2.5; };
  };
  rolloutPolicies = example.rolloutPolicies // {
    canary = example.rolloutPolicies.canary // {
      onHealthFailure = "rollback";
      waves = [ { selector.all = true; soakMinutes = -5; } ];
    };
  };
}
