//! Membership proof: an HMAC-SHA256 challenge–response over fresh nonces from both sides, so the
//! group secret never crosses the wire and a recorded handshake cannot be replayed.
//!
//! ```text
//! acceptor  -> connector : MAGIC, nonce_a (32 B)
//! connector -> acceptor  : MAGIC, rank, world, nonce_c (32 B),
//!                          HMAC(secret, "connect" | nonce_a | nonce_c | rank | world)
//! acceptor  -> connector : HMAC(secret, "accept" | nonce_a | nonce_c | acceptor rank | world)
//! ```
//! The acceptor checks that the claimed rank is the neighbour it expects (its ring predecessor)
//! and closes the connection without answering on any failure; the connector checks the answer,
//! so both ends are authenticated. Tags are compared in constant time (`Mac::verify_slice`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{CollectiveError, Result};

/// Protocol magic and version, the first bytes both sides send.
pub const MAGIC: &[u8; 8] = b"PDCRING1";
const NONCE: usize = 32;
const TAG: usize = 32;

type HmacSha256 = Hmac<Sha256>;

fn fresh_nonce() -> std::io::Result<[u8; NONCE]> {
    let mut nonce = [0u8; NONCE];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

fn mac(
    secret: &[u8],
    label: &[u8],
    nonce_a: &[u8],
    nonce_c: &[u8],
    rank: u32,
    world: u32,
) -> HmacSha256 {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(label);
    m.update(nonce_a);
    m.update(nonce_c);
    m.update(&rank.to_le_bytes());
    m.update(&world.to_le_bytes());
    m
}

fn auth_err(stream: &TcpStream, detail: impl Into<String>) -> CollectiveError {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    CollectiveError::Auth {
        peer,
        detail: detail.into(),
    }
}

fn io(stream: &TcpStream, e: std::io::Error) -> CollectiveError {
    auth_err(stream, format!("handshake i/o: {e}"))
}

/// Acceptor side: returns once the connecting peer proved the secret and claimed `expected_rank`.
pub fn accept(
    stream: &mut TcpStream,
    secret: &[u8],
    my_rank: usize,
    world: usize,
    expected_rank: usize,
    timeout: Duration,
) -> Result<()> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| io(stream, e))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| io(stream, e))?;
    let nonce_a = fresh_nonce().map_err(|e| io(stream, e))?;
    let mut hello = [0u8; 8 + NONCE];
    hello[..8].copy_from_slice(MAGIC);
    hello[8..].copy_from_slice(&nonce_a);
    stream.write_all(&hello).map_err(|e| io(stream, e))?;

    let mut reply = [0u8; 8 + 4 + 4 + NONCE + TAG];
    stream.read_exact(&mut reply).map_err(|e| io(stream, e))?;
    if &reply[..8] != MAGIC {
        return Err(auth_err(stream, "bad magic"));
    }
    let rank = u32::from_le_bytes([reply[8], reply[9], reply[10], reply[11]]);
    let their_world = u32::from_le_bytes([reply[12], reply[13], reply[14], reply[15]]);
    let nonce_c = &reply[16..16 + NONCE];
    let tag = &reply[16 + NONCE..];
    mac(secret, b"connect", &nonce_a, nonce_c, rank, their_world)
        .verify_slice(tag)
        .map_err(|_| auth_err(stream, "wrong group secret"))?;
    if rank as usize != expected_rank || their_world as usize != world {
        return Err(auth_err(
            stream,
            format!(
                "claims rank {rank} of {their_world}, expected rank {expected_rank} of {world}"
            ),
        ));
    }
    let answer = mac(
        secret,
        b"accept",
        &nonce_a,
        nonce_c,
        my_rank as u32,
        world as u32,
    );
    stream
        .write_all(&answer.finalize().into_bytes())
        .map_err(|e| io(stream, e))
}

/// Connector side: proves the secret as `my_rank` and checks that the acceptor is
/// `expected_rank` of the same group.
pub fn connect(
    stream: &mut TcpStream,
    secret: &[u8],
    my_rank: usize,
    world: usize,
    expected_rank: usize,
    timeout: Duration,
) -> Result<()> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| io(stream, e))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| io(stream, e))?;
    let mut hello = [0u8; 8 + NONCE];
    stream.read_exact(&mut hello).map_err(|e| io(stream, e))?;
    if &hello[..8] != MAGIC {
        return Err(auth_err(stream, "bad magic"));
    }
    let nonce_a = &hello[8..];
    let nonce_c = fresh_nonce().map_err(|e| io(stream, e))?;
    let tag = mac(
        secret,
        b"connect",
        nonce_a,
        &nonce_c,
        my_rank as u32,
        world as u32,
    );
    let mut reply = Vec::with_capacity(8 + 8 + NONCE + TAG);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&(my_rank as u32).to_le_bytes());
    reply.extend_from_slice(&(world as u32).to_le_bytes());
    reply.extend_from_slice(&nonce_c);
    reply.extend_from_slice(&tag.finalize().into_bytes());
    stream.write_all(&reply).map_err(|e| io(stream, e))?;

    let mut answer = [0u8; TAG];
    stream
        .read_exact(&mut answer)
        .map_err(|e| auth_err(stream, format!("refused by the acceptor ({e})")))?;
    mac(
        secret,
        b"accept",
        nonce_a,
        &nonce_c,
        expected_rank as u32,
        world as u32,
    )
    .verify_slice(&answer)
    .map_err(|_| auth_err(stream, "acceptor did not prove the group secret"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        server_secret: &'static [u8],
        client_secret: &'static [u8],
        claim: usize,
    ) -> (Result<()>, Result<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = Duration::from_secs(5);
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            accept(&mut s, server_secret, 1, 3, 0, t)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let client = connect(&mut c, client_secret, claim, 3, 1, t);
        (server.join().unwrap(), client)
    }

    #[test]
    fn same_secret_passes_both_ways() {
        let (s, c) = pair(b"k", b"k", 0);
        s.unwrap();
        c.unwrap();
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (s, c) = pair(b"k", b"not-k", 0);
        assert!(matches!(s, Err(CollectiveError::Auth { .. })), "{s:?}");
        assert!(matches!(c, Err(CollectiveError::Auth { .. })), "{c:?}");
    }

    #[test]
    fn member_claiming_the_wrong_rank_is_refused() {
        let (s, c) = pair(b"k", b"k", 2);
        assert!(matches!(s, Err(CollectiveError::Auth { .. })), "{s:?}");
        assert!(c.is_err());
    }
}
