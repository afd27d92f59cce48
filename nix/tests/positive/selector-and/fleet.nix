# `and`: every member must hold. `and = [ ]` holds vacuously (every host), as in release.
let
  host = tags: channel: { system = "x86_64-linux"; inherit tags channel; };
  channel = { rolloutPolicy = "combined"; reconcileIntervalMinutes = 30; signingIntervalMinutes = 60; freshnessWindow = 1440; };
in
{
  hosts = {
    eu-web-01 = host [ "eu" "web" ] "prod";
    eu-db-01 = host [ "eu" "db" ] "prod";
    us-web-01 = host [ "us" "web" ] "prod";
    us-db-01 = host [ "us" "db" ] "prod";
    lab-01 = host [ "eu" "web" ] "lab";
  };
  channels = {
    prod = channel;
    lab = channel;
  };
  rolloutPolicies.combined = {
    strategy = "staged";
    waves = [
      {
        selector.and = [
          { tags = [ "eu" ]; }
          { not.tags = [ "db" ]; }
          { channel = "prod"; }
        ];
        soakMinutes = 30;
      }
      { selector.and = [ { tagsAny = [ "us" ]; } { and = [ { tags = [ "web" ]; } ]; } ]; soakMinutes = 20; }
      { selector.and = [ ]; soakMinutes = 10; }
      { selector.all = true; soakMinutes = 0; }
    ];
    healthGate.maxFailures = 0;
    onHealthFailure = "rollback-and-halt";
  };
}
