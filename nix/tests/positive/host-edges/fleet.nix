# edges: a dependency DAG between hosts, across waves and channels. Edges keep their
# order; a missing reason is written as null.
let
  host = channel: { system = "x86_64-linux"; inherit channel; };
  channel = { rolloutPolicy = "one-wave"; reconcileIntervalMinutes = 30; signingIntervalMinutes = 60; freshnessWindow = 1440; };
in
{
  hosts = {
    db-01 = host "prod";
    db-02 = host "prod";
    api-01 = host "prod";
    web-01 = host "prod";
    web-02 = host "prod";
    lab-01 = host "lab";
  };
  channels = {
    prod = channel;
    lab = channel;
  };
  rolloutPolicies.one-wave = {
    strategy = "all-at-once";
    waves = [ { selector.all = true; soakMinutes = 0; } ];
    healthGate.maxFailures = 0;
    onHealthFailure = "halt";
  };
  edges = [
    { before = "db-01"; after = "db-02"; reason = "primary before replica"; }
    { before = "db-01"; after = "api-01"; }
    { before = "db-02"; after = "api-01"; reason = null; }
    { before = "api-01"; after = "web-01"; }
    { before = "api-01"; after = "web-02"; }
    { before = "lab-01"; after = "db-01"; reason = "try the migration on the lab first"; }
  ];
}
