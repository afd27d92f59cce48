# Limits that cannot work: a percentage over 100, and 0 hosts in flight.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  disruptionBudgets = [
    { selector.tags = [ "web" ]; maxInFlightPct = 150; }
    { selector.tags = [ "db" ]; maxInFlight = 0; }
    { selector.tags = [ "lab" ]; maxInFlightPct = 0; }
  ];
}
