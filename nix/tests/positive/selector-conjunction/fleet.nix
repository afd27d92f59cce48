# Several keys in one selector: each must hold, like an implicit `and`.
let
  host = tags: channel: { system = "x86_64-linux"; inherit tags channel; };
  channel = { rolloutPolicy = "narrow-first"; reconcileIntervalMinutes = 30; signingIntervalMinutes = 60; freshnessWindow = 1440; };
in
{
  hosts = {
    web-01 = host [ "web" "canary" ] "prod";
    web-02 = host [ "web" "canary" ] "prod";
    web-03 = host [ "web" ] "prod";
    db-01 = host [ "db" "canary" ] "prod";
    web-09 = host [ "web" "canary" ] "edge";
  };
  channels = {
    prod = channel;
    edge = channel;
  };
  rolloutPolicies.narrow-first = {
    strategy = "canary";
    waves = [
      {
        selector = {
          tags = [ "web" ];
          tagsAny = [ "canary" "early" ];
          channel = "prod";
          not.hosts = [ "web-02" ];
          all = true;
          and = [ { hosts = [ "web-01" "web-02" "web-03" ]; } ];
        };
        soakMinutes = 60;
      }
      { selector = { tags = [ "canary" ]; hosts = [ "db-01" "web-02" "web-09" ]; }; soakMinutes = 30; }
      { selector = { tags = [ "web" ]; all = false; }; soakMinutes = 0; }
    ];
    healthGate.maxFailures = 1;
    onHealthFailure = "halt";
  };
  disruptionBudgets = [
    { selector = { tags = [ "web" ]; channel = "prod"; }; maxInFlight = 2; maxInFlightPct = 50; }
  ];
}
