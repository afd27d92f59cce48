# `channel`: one policy shared by two channels. Its first wave selects the "beta"
# channel, so on "prod" that wave stays empty (kept, so wave indices match the policy)
# and prod's hosts fall through. The budget is scoped to one channel too.
let
  host = channel: { system = "x86_64-linux"; tags = [ "app" ]; inherit channel; };
  channel = { rolloutPolicy = "shared"; reconcileIntervalMinutes = 30; signingIntervalMinutes = 60; freshnessWindow = 1440; };
in
{
  hosts = {
    app-01 = host "beta";
    app-02 = host "prod";
    app-03 = host "prod";
  };
  channels = {
    beta = channel;
    prod = channel;
  };
  rolloutPolicies.shared = {
    strategy = "canary";
    waves = [
      { selector.channel = "beta"; soakMinutes = 60; }
      { selector.channel = "prod"; soakMinutes = 0; }
    ];
    healthGate.maxFailures = 0;
    onHealthFailure = "halt";
  };
  disruptionBudgets = [ { selector.channel = "prod"; maxInFlight = 1; } ];
}
