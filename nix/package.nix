# One binary of the nixfleet workspace, built with nixpkgs' Rust builder. Used by
# flake.nix (packages.<system>.*) and as the modules' default `package`, through
# `pkgs.callPackage ./package.nix { crate = …; mainProgram = …; }`.
{
  lib,
  rustPlatform,
  # The workspace member to build (cargo -p), and the binary it installs.
  crate,
  mainProgram,
}:
let
  root = toString ../.;
  workspace = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  # Only what cargo reads: editing docs or Nix files does not rebuild the binaries.
  wanted =
    path:
    let
      rel = builtins.substring (builtins.stringLength root + 1) (builtins.stringLength path) path;
    in
    builtins.elem rel [
      "Cargo.toml"
      "Cargo.lock"
      "crates"
    ]
    || builtins.substring 0 7 rel == "crates/";
in
rustPlatform.buildRustPackage {
  pname = crate;
  inherit (workspace.workspace.package) version;

  src = builtins.path {
    name = "nixfleet-source";
    path = ../.;
    filter = path: _type: wanted path;
  };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [
    "-p"
    crate
  ];
  # The test suite drives the real nix-instantiate, openssl, ssh-keygen and the other
  # binaries of the workspace; it runs in CI (scripts/test), not in the build sandbox.
  doCheck = false;

  meta = {
    description = "nixfleet: pull-based fleet management for NixOS (${crate})";
    license = with lib.licenses; [
      mit
      asl20
    ];
    platforms = lib.platforms.linux;
    inherit mainProgram;
  };
}
