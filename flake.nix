{
  description = "nixfleet: pull-based fleet management for NixOS";

  # nixpkgs builds the packages, and nothing else reads it: lib is builtins only, so a
  # fleet evaluates without nixpkgs, and the modules build with the host's own pkgs.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # binary -> the workspace member that builds it
      crates = {
        nixfleet = "nixfleet-cli";
        nixfleet-agent = "nixfleet-agent";
        nixfleet-control-plane = "nixfleet-control-plane";
      };
      # nixpkgs is only touched inside each package's value, so listing the outputs (or
      # using lib) never fetches it.
      packagesFor =
        system:
        let
          pkgs = nixpkgs.legacyPackages.${system};
          built = builtins.mapAttrs (
            mainProgram: crate: pkgs.callPackage ./nix/package.nix { inherit crate mainProgram; }
          ) crates;
        in
        built // { default = built.nixfleet; };
    in
    {
      # fleet = nixfleet.lib.mkFleet { hosts = …; channels = …; rolloutPolicies = …; };
      # then `fleet.resolved` is the input of `nixfleet release --fleet`.
      lib = import ./nix/lib;

      # services.nixfleet-agent / services.nixfleet-control-plane, plus nixfleet.trust.
      nixosModules = {
        agent = ./nix/modules/agent.nix;
        control-plane = ./nix/modules/control-plane.nix;
      };
      darwinModules.agent = ./nix/modules/darwin-agent.nix; # nix-darwin: docs/darwin.md

      packages = builtins.listToAttrs (
        map (system: {
          name = system;
          value = packagesFor system;
        }) systems
      );
    };
}
