//! The opaque causal-context token clients carry between a read and a write:
//! base64url (no padding) of the context's postcard encoding. HTTP's
//! `X-Dynamo-Context` header and the CLI's `--context` both use it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use dynamo_proto::Context;

/// Largest token accepted (a context is a few bytes per actor; this is generous).
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

pub fn encode(context: &Context) -> String {
    let bytes = postcard::to_allocvec(context).expect("a context always serializes");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a token, with an error that says what is wrong with it.
pub fn decode(token: &str) -> Result<Context, String> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "context token is {} bytes, more than {MAX_TOKEN_LEN}: pass the token exactly as a read returned it",
            token.len()
        ));
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|e| {
        format!("context token is not base64url ({e}): pass it exactly as a read returned it")
    })?;
    let (context, rest) = postcard::take_from_bytes::<Context>(&bytes).map_err(|e| {
        format!("context token does not decode ({e}): pass it exactly as a read returned it")
    })?;
    if !rest.is_empty() {
        return Err(
            "context token has trailing bytes: pass it exactly as a read returned it".into(),
        );
    }
    let mut context = context;
    dynamo_core::version::compact(&mut context);
    Ok(context)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_proto::{Actor, Dot};

    #[test]
    fn round_trip_and_garbage() {
        let mut ctx = Context::default();
        let actor = Actor {
            incarnation: 9,
            epoch: 2,
        };
        ctx.vv.insert(actor, 3);
        ctx.dots.insert(Dot { actor, counter: 7 });
        assert_eq!(decode(&encode(&ctx)).unwrap(), ctx);
        assert_eq!(
            decode(&encode(&Context::default())).unwrap(),
            Context::default()
        );
        assert!(decode("!!!").unwrap_err().contains("base64url"));
        assert!(decode("AAAA_w").is_err());
    }
}
