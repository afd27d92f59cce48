# Empty selectors hidden inside `not` and `and` are found too, and located.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  disruptionBudgets = [
    { selector.not = { }; maxInFlight = 1; }
    { selector.and = [ { tags = [ "db" ]; } { not.hosts = null; } ]; maxInFlight = 1; }
  ];
}
