//! The one module that knows the body encoding (bincode 2 with its serde integration): swapping
//! it (RUSTSEC-2025-0141: bincode is unmaintained) is a change to this file only.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decoding refuses to read more than this from one message, so that a corrupt length prefix
/// cannot ask for an absurd allocation.
const DECODE_LIMIT_BYTES: usize = 64 * 1024 * 1024;

/// Appends the encoded body of `message` to `buffer`.
pub(crate) fn encode_body<T: Serialize>(message: &T, buffer: &mut Vec<u8>) {
    let config = bincode::config::standard();
    // Writing into a Vec cannot fail for lack of room, and the wire types hold only strings,
    // integers, byte arrays, options, vectors and enums, which bincode's serde encoder always
    // accepts (no maps, no sequences of unknown length, no custom `Serialize` that errors).
    #[allow(clippy::expect_used)]
    bincode::serde::encode_into_std_write(message, buffer, config).expect("wire types always encode");
}

/// Decodes one whole body: every byte must belong to the message.
pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let config = bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>();
    match bincode::serde::decode_from_slice::<T, _>(body, config) {
        Ok((message, read)) if read == body.len() => Ok(message),
        Ok((_, read)) => Err(format!("{} trailing bytes after the message", body.len() - read)),
        Err(error) => Err(error.to_string()),
    }
}
