# channelEdges: a diamond, lab before canary and staging, both before prod. A DAG with
# two paths to one channel is not a cycle.
let
  channel = rolloutPolicy: { inherit rolloutPolicy; reconcileIntervalMinutes = 10; signingIntervalMinutes = 60; freshnessWindow = 1440; };
  host = channel: { system = "x86_64-linux"; inherit channel; };
  policy = {
    strategy = "all-at-once";
    waves = [ { selector.all = true; soakMinutes = 0; } ];
    healthGate.maxFailures = 0;
    onHealthFailure = "halt";
  };
in
{
  hosts = {
    lab-01 = host "lab";
    canary-01 = host "canary";
    staging-01 = host "staging";
    prod-01 = host "prod";
    prod-02 = host "prod";
  };
  channels = {
    lab = channel "fast";
    canary = channel "fast";
    staging = channel "fast";
    prod = channel "careful";
  };
  rolloutPolicies = {
    fast = policy;
    careful = policy // {
      waves = [
        { selector.hosts = [ "prod-01" ]; soakMinutes = 120; }
        { selector.all = true; soakMinutes = 0; }
      ];
      onHealthFailure = "rollback-and-halt";
    };
  };
  channelEdges = [
    { before = "lab"; after = "canary"; reason = "lab soaks first"; }
    { before = "lab"; after = "staging"; }
    { before = "canary"; after = "prod"; }
    { before = "staging"; after = "prod"; reason = "integration tests pass on staging"; }
  ];
}
