# `hosts`: waves naming hosts one by one. The order inside a selector does not matter:
# resolved waves list their hosts sorted.
let
  host = { system = "x86_64-linux"; channel = "prod"; };
in
{
  hosts = {
    a-01 = host;
    b-01 = host;
    c-01 = host;
    d-01 = host;
    e-01 = host // { system = "aarch64-linux"; };
  };
  channels.prod = {
    rolloutPolicy = "hand-picked";
    reconcileIntervalMinutes = 10;
    signingIntervalMinutes = 30;
    freshnessWindow = 720;
  };
  rolloutPolicies.hand-picked = {
    strategy = "manual";
    waves = [
      { selector.hosts = [ "c-01" ]; soakMinutes = 45; }
      { selector.hosts = [ "e-01" "a-01" ]; soakMinutes = 15; }
      { selector.hosts = [ "c-01" "d-01" ]; soakMinutes = 0; } # c-01 is already in wave 0
    ];
    healthGate = { systemdFailedUnits.max = 0; maxFailures = 0; };
    onHealthFailure = "rollback-and-halt";
  };
}
