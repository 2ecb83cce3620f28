//! Rate limits on the client service over TCP: per token (a tenant's CI cannot starve the
//! others) and per client address (counted before authentication, so neither guessing
//! tokens nor reconnecting escapes it). Token buckets from `governor`; over a limit a
//! request gets `RESOURCE_EXHAUSTED` at once. The unix socket has none: local access is the
//! local trust model.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;

/// Requests per second a token may make, and in one burst. A build makes three (find the
/// missing files, upload them, build); a bake of a hundred targets fits in one burst.
pub const TOKEN_RATE: (u32, u32) = (50, 500);
/// Requests per second one client address may make, and in one burst.
pub const CONNECTION_RATE: (u32, u32) = (100, 1000);

/// Forgotten buckets are dropped every this many checks.
const RETAIN_EVERY: u64 = 4096;

/// The buckets of one listener.
pub(crate) struct RateLimits {
    tokens: DefaultKeyedRateLimiter<String>,
    addresses: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

fn quota((per_second, burst): (u32, u32)) -> Quota {
    let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nonzero(per_second)).allow_burst(nonzero(burst))
}

impl RateLimits {
    pub(crate) fn new() -> RateLimits {
        RateLimits {
            tokens: RateLimiter::keyed(quota(TOKEN_RATE)),
            addresses: RateLimiter::keyed(quota(CONNECTION_RATE)),
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one request from `peer` (before it is authenticated).
    pub(crate) fn check_peer(&self, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.tokens.retain_recent();
            self.addresses.retain_recent();
        }
        match peer {
            Some(peer) if self.addresses.check_key(&peer.ip()).is_err() => {
                let (per_second, burst) = CONNECTION_RATE;
                Err(ApiError::RateLimited { who: format!("client {}", peer.ip()), per_second, burst })
            }
            _ => Ok(()),
        }
    }

    /// Counts one request of `token` (its name), once authenticated.
    pub(crate) fn check_token(&self, token: Option<&str>) -> Result<(), ApiError> {
        if let Some(token) = token
            && self.tokens.check_key(&token.to_string()).is_err()
        {
            let (per_second, burst) = TOKEN_RATE;
            return Err(ApiError::RateLimited { who: format!("token {token:?}"), per_second, burst });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_over_the_limit_is_refused_per_token_and_per_address() {
        let limits = RateLimits::new();
        let here: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (_, token_burst) = TOKEN_RATE;
        // Within a burst (no time passes that would matter at this rate).
        for _ in 0..token_burst {
            limits.check_token(Some("ci")).unwrap();
        }
        assert!(matches!(limits.check_token(Some("ci")), Err(ApiError::RateLimited { .. })));
        limits.check_token(Some("other")).unwrap();
        let (_, address_burst) = CONNECTION_RATE;
        for _ in 0..address_burst {
            limits.check_peer(Some(here)).unwrap();
        }
        // Another port of the same address (a new connection) shares the bucket.
        let refused = limits.check_peer(Some("127.0.0.1:2".parse().unwrap())).unwrap_err();
        assert!(refused.to_string().contains("client 127.0.0.1:"), "{refused}");
    }
}
