# `all`: `true` takes every host, `false` none. Channel "prod" puts everything in its
# first wave and leaves the second empty. On channel "paused", `all = false` keeps the
# first wave empty, and as the selector of the last wave it still receives every host
# that no earlier wave took.
let
  host = channel: { system = "x86_64-linux"; inherit channel; };
  channel = rolloutPolicy: { inherit rolloutPolicy; reconcileIntervalMinutes = 60; signingIntervalMinutes = 60; freshnessWindow = 240; };
in
{
  hosts = {
    n-01 = host "prod";
    n-02 = host "prod";
    p-01 = host "paused";
    p-02 = host "paused" // { tags = [ "early" ]; };
  };
  channels = {
    prod = channel "everything-first";
    paused = channel "nothing-first";
  };
  rolloutPolicies = {
    everything-first = {
      strategy = "all-at-once";
      waves = [
        { selector.all = true; soakMinutes = 5; }
        { selector.all = true; soakMinutes = 0; }
      ];
      healthGate.systemdFailedUnits.max = 3;
      onHealthFailure = "halt";
    };
    nothing-first = {
      strategy = "all-at-once";
      waves = [
        { selector.all = false; soakMinutes = 60; }
        { selector.tags = [ "early" ]; soakMinutes = 30; }
        { selector.all = false; soakMinutes = 0; }
      ];
      healthGate = { };
      onHealthFailure = "halt";
    };
  };
}
