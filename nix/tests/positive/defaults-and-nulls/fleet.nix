# Everything optional left out or set to null: the output still has every field, with
# the reference defaults (tags [], compliance mode "enforce", maxFailures 0) and explicit
# nulls. `configuration` is for CI to build and never appears in the JSON; a selector
# key set to null is dropped.
{
  hosts = {
    bare-01 = { system = "x86_64-linux"; channel = "prod"; };
    nulls-01 = { system = "x86_64-linux"; channel = "prod"; tags = null; pubkey = null; configuration = null; };
    configured-01 = {
      system = "aarch64-linux";
      channel = "prod";
      tags = [ "arm" ];
      pubkey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHp3W1nJ4Jm5Yc3Bf0Kt7sVb8lqPzv4mQe9R2uN6aXyD root@configured-01";
      configuration = { config, ... }: { networking.hostName = "configured-01"; };
    };
  };
  channels.prod = {
    rolloutPolicy = "minimal";
    reconcileIntervalMinutes = 30;
    signingIntervalMinutes = 60;
    freshnessWindow = 120;
    compliance = null;
  };
  rolloutPolicies.minimal = {
    strategy = "all-at-once";
    waves = [
      { selector = { tags = [ "arm" ]; channel = null; not = null; }; soakMinutes = 0; }
      { selector = { all = true; and = null; }; soakMinutes = 0; }
    ];
    healthGate = { systemdFailedUnits = null; maxFailures = null; };
    onHealthFailure = "halt";
  };
  edges = null;
  channelEdges = [ ];
  disruptionBudgets = [ { selector.hosts = [ "bare-01" ]; maxInFlight = 1; maxInFlightPct = null; } ];
}
