# nixfleet.trust: the pinned public trust roots (SPEC.md §2). The control-plane and agent
# modules both import this file and write their own trust.json from it, so that a flake
# pins the roots once for every host. Only public keys go here.
{ lib, ... }:
let
  inherit (lib) mkOption types;

  base64 = types.strMatching "[A-Za-z0-9+/]+={0,2}";

  key =
    algorithms:
    types.submodule {
      options = {
        algorithm = mkOption {
          type = types.enum algorithms;
          default = "ed25519";
          description = "Signature algorithm of the key: ${lib.concatStringsSep " or " algorithms}.";
        };
        public = mkOption {
          type = base64;
          description = "The public key, base64 (ed25519: the raw 32 bytes; ecdsa-p256: the SEC1 point), as `nixfleet keygen` prints it.";
        };
      };
    };

  slot =
    what: algorithms:
    types.submodule {
      options = {
        current = mkOption {
          type = key algorithms;
          description = "The key that signs ${what} now.";
        };
        previous = mkOption {
          type = types.nullOr (key algorithms);
          default = null;
          description = "The key being rotated out, still accepted during the grace period.";
        };
        rejectBefore = mkOption {
          # RFC 3339, checked by the binaries; the pattern only catches typos early.
          type = types.nullOr (types.strMatching "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9]{2}:[0-9]{2})");
          default = null;
          example = "2026-11-27T10:00:00Z";
          description = "The compromise switch: anything signed before this instant is refused, whichever key signed it.";
        };
      };
    };
in
{
  options.nixfleet.trust = {
    ciReleaseKey = mkOption {
      type = types.nullOr (slot "releases, rollout manifests and revocations" [ "ed25519" "ecdsa-p256" ]);
      default = null;
      description = ''
        The CI release key. With it and {option}`nixfleet.trust.orgRootKey` set, each
        enabled nixfleet service gets its trust.json written from these options; leave
        both null to provide the file another way.
      '';
    };
    orgRootKey = mkOption {
      type = types.nullOr (slot "bootstrap tokens" [ "ed25519" ]);
      default = null;
      description = "The org root key, which signs bootstrap tokens (ed25519 only).";
    };
    cacheKeys = mkOption {
      type = types.listOf (types.strMatching "[^:[:space:]]+:[A-Za-z0-9+/]+={0,2}");
      default = [ ];
      example = [ "fleet-cache-1:Ff8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" ];
      description = "Public keys of the binary caches (Nix format `name:base64`) that agents accept closures from.";
    };
  };
}
