{
  description = "nixfleet: pull-based fleet management for NixOS";

  # No inputs: the library is builtins only, so a fleet evaluates without nixpkgs.
  outputs =
    { self }:
    {
      # fleet = nixfleet.lib.mkFleet { hosts = …; channels = …; rolloutPolicies = …; };
      # then `fleet.resolved` is the input of `nixfleet release --fleet`.
      lib = import ./nix/lib;
    };
}
