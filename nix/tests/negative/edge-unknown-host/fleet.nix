# An edge naming a host that is not in the fleet (a typo for db-01).
let
  example = import ../../positive/example/fleet.nix;
in
example // { edges = [ { before = "db-1"; after = "web-01"; } ]; }
