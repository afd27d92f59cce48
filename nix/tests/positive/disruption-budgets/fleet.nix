# disruptionBudgets: count, percentage, or both; any selector; budgets may overlap.
# Only the limits set are non-null.
let
  host = tags: { system = "x86_64-linux"; inherit tags; channel = "prod"; };
in
{
  hosts = {
    db-01 = host [ "db" "eu" ];
    db-02 = host [ "db" "us" ];
    web-01 = host [ "web" "eu" ];
    web-02 = host [ "web" "us" ];
    web-03 = host [ "web" "us" ];
  };
  channels.prod = {
    rolloutPolicy = "all";
    reconcileIntervalMinutes = 30;
    signingIntervalMinutes = 60;
    freshnessWindow = 1440;
  };
  rolloutPolicies.all = {
    strategy = "all-at-once";
    waves = [ { selector.all = true; soakMinutes = 0; } ];
    healthGate.maxFailures = 0;
    onHealthFailure = "halt";
  };
  disruptionBudgets = [
    { selector.tags = [ "db" ]; maxInFlight = 1; }
    { selector.tagsAny = [ "web" ]; maxInFlightPct = 34; }
    { selector.tags = [ "us" ]; maxInFlight = 2; maxInFlightPct = 100; }
    { selector.hosts = [ "db-01" "web-01" ]; maxInFlight = 1; maxInFlightPct = null; }
    { selector.and = [ { all = true; } { not.channel = "lab"; } ]; maxInFlightPct = 1; }
  ];
}
