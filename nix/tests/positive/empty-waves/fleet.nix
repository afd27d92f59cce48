# Waves that select no host are kept, empty, so that wave indices always match the
# policy's: in the middle, at the end, and for a channel that has no host at all.
let
  host = tags: { system = "x86_64-linux"; inherit tags; channel = "prod"; };
  channel = { rolloutPolicy = "three-waves"; reconcileIntervalMinutes = 30; signingIntervalMinutes = 60; freshnessWindow = 1440; };
in
{
  hosts = {
    web-01 = host [ "web" ];
    web-02 = host [ "web" ];
    db-01 = host [ "db" ];
  };
  channels = {
    prod = channel;
    unused = channel;
  };
  rolloutPolicies.three-waves = {
    strategy = "staged";
    waves = [
      { selector.tags = [ "web" ]; soakMinutes = 30; }
      { selector.tags = [ "cache" ]; soakMinutes = 20; }
      { selector.tags = [ "db" ]; soakMinutes = 10; }
      { selector.tags = [ "queue" ]; soakMinutes = 0; }
    ];
    healthGate.maxFailures = 0;
    onHealthFailure = "halt";
  };
}
