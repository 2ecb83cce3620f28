//! The protobuf codec of every Kiln service: prost's, except that a message that does not
//! decode (invalid UTF-8 in a string, a truncated field) is the sender's fault and answered
//! with `INVALID_ARGUMENT` instead of prost's `INTERNAL`.

use kiln_model::ErrorKind;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

/// A [`ProstCodec`] whose decode errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct KilnCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for KilnCodec<T, U> {
    fn default() -> Self {
        KilnCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for KilnCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = KilnDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        KilnDecoder(self.0.decoder())
    }
}

/// Prost's decoder with its errors re-coded.
#[derive(Debug)]
pub struct KilnDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for KilnDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(buf).map_err(|status| match status.code() {
            tonic::Code::Internal => {
                crate::status(ErrorKind::BadRequest, format!("malformed message: {}", status.message()))
            }
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
