//! One real client certificate per simulated host, issued in-process by the fleet CA from
//! a CSR signed with the host's key, exactly as `/v1/enroll` would issue it.

use nixfleet_pki::{FleetCa, HostExpectation};
use nixfleet_trust::keys::PrivateKey;
use time::OffsetDateTime;

use crate::fleet::host_key;
use crate::LoadgenError;

pub struct HostIdentity {
    pub hostname: String,
    pub key: PrivateKey,
    pub cert_pem: String,
}

fn mint_one(
    ca: &FleetCa,
    seed: &str,
    hostname: &str,
    now: OffsetDateTime,
    validity: time::Duration,
) -> Result<HostIdentity, LoadgenError> {
    let key = host_key(seed, hostname);
    let pki = |what: &str| {
        let what = format!("{what} for {hostname}");
        move |source| LoadgenError::Pki { what, source }
    };
    let csr = nixfleet_pki::build_host_csr(hostname, &key).map_err(pki("cannot build a CSR"))?;
    let expectation = HostExpectation {
        hostname: hostname.to_owned(),
        ssh_fingerprint: None,
    };
    let issued = nixfleet_pki::issue_host_cert(ca, &csr, &expectation, now, validity)
        .map_err(pki("the fleet CA refused to issue a certificate"))?;
    Ok(HostIdentity {
        hostname: hostname.to_owned(),
        key,
        cert_pem: issued.cert_pem,
    })
}

/// Issues certificates for `hostnames` on `threads` threads, in order.
pub fn mint(
    ca: &FleetCa,
    seed: &str,
    hostnames: &[String],
    now: OffsetDateTime,
    validity: time::Duration,
    threads: usize,
) -> Result<Vec<HostIdentity>, LoadgenError> {
    let chunk = hostnames.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = hostnames
            .chunks(chunk)
            .map(|names| {
                scope.spawn(move || {
                    names
                        .iter()
                        .map(|h| mint_one(ca, seed, h, now, validity))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(hostnames.len());
        for worker in workers {
            let minted = worker.join().map_err(|_| {
                LoadgenError::Usage("a certificate minting thread panicked".into())
            })??;
            out.extend(minted);
        }
        Ok(out)
    })
}
