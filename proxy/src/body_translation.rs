//! Link translation in response bodies: for apps with `translation.body`, internal URLs in
//! HTML and CSS are rewritten to the app's external URL while the body streams.
//!
//! **What is translated.** A URL is translated by the rules [`translate_response`] applies
//! to `Location` ([`LinkTranslation`]): absolute (`http`/`https`) and scheme-relative URLs
//! that point into the app's internal URL (its host, port and path prefix) move onto the
//! external URL; URLs elsewhere and relative URLs stay as they are.
//!
//! - HTML (`text/html`, `application/xhtml+xml`), through Cloudflare's streaming rewriter
//!   `lol_html`: the URL attributes (`a`/`area`/`link`/`base` `href`,
//!   `img`/`script`/`iframe`/`frame`/`embed`/`source`/`video`/`audio`/`track`/`input`
//!   `src`, `video poster`, `object data`, `form action`, `formaction`), `srcset` and
//!   `imagesrcset` candidate lists, `<meta http-equiv="refresh" content="N; url=...">`,
//!   `style` attributes and `<style>` elements. Inline scripts are not touched.
//! - CSS (`text/css`), and the CSS of `style` attributes and `<style>` elements: the URL of
//!   each `url(...)` (quoted or not) and `@import "..."`, found by a small
//!   scanner that holds back at most [`MAX_CSS_TOKEN`] bytes of an unfinished token across
//!   chunk boundaries. It does not skip comments or strings: a URL there is translated
//!   like any other, which does no harm. URLs written with CSS escapes are left alone.
//!
//! **Streaming.** The translated body is produced as the backend's arrives: every input
//! frame is fed to the translator in slices of at most [`FEED_CHUNK`] bytes, and what the
//! translator gives back for a slice is sent at once, so the body holds about one slice of
//! output besides the rewriter's own buffer for an unfinished tag, which
//! [`HTML_MEMORY_LIMIT`] caps. A tag larger than that (a huge inline `data:` URL) stops
//! the translation gracefully: the rest of the body passes through untranslated.
//!
//! **Compressed bodies** (`Content-Encoding: gzip`, `deflate`, `br`) are decoded as they
//! stream (async-compression) and sent on uncompressed, without `Content-Encoding`: the
//! proxy does not re-compress. Other or stacked codings (`zstd`, `gzip, br`) are not
//! translated (logged at debug). Trailers of a decoded body are dropped.
//!
//! **Charset.** HTML is read in the `charset` of `Content-Type` when `lol_html` supports it
//! (every ASCII-compatible WHATWG encoding); without one it starts as UTF-8 and follows a
//! `<meta charset>`. UTF-16 and other unsupported charsets are not translated. CSS is
//! translated in UTF-8 and single-byte charsets only, where an ASCII byte is always an
//! ASCII character.
//!
//! **Headers.** A translated response loses `Content-Length` (the length changes), its
//! digests (`Content-MD5`, `Digest`, `Content-Digest`, `Repr-Digest`), and gets a weak
//! `ETag` (`W/"..."`: the same content, not the same bytes, which `If-None-Match` still
//! matches at the backend) and `Accept-Ranges: none`. Partial (`206`) and bodiless
//! (`1xx`, `204`, `304`) responses are not translated.
//!
//! **Errors.** A failure mid-stream (the backend's body, decoding, the rewriter) ends the
//! body with a [`BodyTranslationError`], logged with the app id: the user sees a truncated
//! response.
//!
//! [`translate_response`]: crate::forward::translate_response

use std::borrow::Cow;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use async_compression::tokio::bufread::{BrotliDecoder, DeflateDecoder, GzipDecoder, ZlibDecoder};
use bytes::Bytes;
use encoding_rs::Encoding;
use futures::{StreamExt as _, TryStreamExt as _};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use lol_html::errors::RewritingError;
use lol_html::html_content::{ContentType, TextChunk};
use lol_html::send::{Element, ElementContentHandlers, HtmlRewriter, Settings};
use lol_html::{AsciiCompatibleEncoding, HandlerResult, MemorySettings, OutputSink, Selector};
use sallyport_api::fleet_config::Route;
use sallyport_tunnel::body::{BoxError, TunnelBody};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::io::StreamReader;
use tracing::{debug, warn};

use crate::forward::LinkTranslation;

/// The most input bytes fed to the translator at once; larger frames are sliced.
pub const FEED_CHUNK: usize = 16 * 1024;

/// The most memory the HTML rewriter may use, mostly to hold an unfinished tag across
/// chunks; past it, translation stops and the rest of the body passes through.
pub const HTML_MEMORY_LIMIT: usize = 1024 * 1024;

/// The longest CSS `url(...)` or `@import "..."` token that is translated; a longer one
/// passes as it is, so the scanner never holds back more than this.
pub const MAX_CSS_TOKEN: usize = 8 * 1024;

/// A translated body failed mid-stream; the response ends there.
#[derive(Debug, thiserror::Error)]
pub enum BodyTranslationError {
    /// The backend's body failed.
    #[error("reading the backend's response body failed: {0}")]
    Read(#[source] BoxError),
    /// The backend's compressed body could not be decoded.
    #[error("decoding the backend's {coding} response body failed: {source}")]
    Decode {
        /// The content coding (`gzip`, `deflate`, `br`).
        coding: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The HTML rewriter failed.
    #[error("rewriting the HTML response body failed: {0}")]
    Html(#[source] RewritingError),
}

/// `response` with internal URLs in its HTML or CSS body rewritten to `route`'s external
/// URL, when the route asks for it; otherwise `response` unchanged. See the module
/// documentation for what is translated and how.
pub fn translate_body(route: &Route, response: Response<TunnelBody>) -> Response<TunnelBody> {
    if !route.translation.body {
        return response;
    }
    let Some(plan) = Plan::new(route, &response) else {
        return response;
    };
    let translator = match plan.translator() {
        Ok(translator) => translator,
        Err(error) => {
            warn!(app = %route.app, %error, "response body not translated: the HTML rewriter cannot be set up");
            return response;
        }
    };
    let (mut parts, body) = response.into_parts();
    adjust_headers(&mut parts.headers, plan.coding.is_some());
    let source = match plan.coding {
        None => Source::Plain(body),
        Some(coding) => Source::Encoded(body, coding, Vec::new()),
    };
    let body = TranslatedBody::new(route.app.clone(), source, translator);
    Response::from_parts(parts, body.boxed_unsync())
}

/// What a response needs to be translated.
struct Plan {
    links: Arc<LinkTranslation>,
    kind: Kind,
    coding: Option<Coding>,
}

/// The kind of body, with its charset.
enum Kind {
    /// HTML in `encoding`; `declared` when `Content-Type` named it (else a
    /// `<meta charset>` may change it).
    Html {
        encoding: AsciiCompatibleEncoding,
        declared: bool,
    },
    /// CSS in an encoding where ASCII bytes are ASCII characters.
    Css,
}

impl Plan {
    /// The plan for `response`, or `None` (logged at debug) when it is not translated.
    fn new(route: &Route, response: &Response<TunnelBody>) -> Option<Self> {
        let app = route.app.as_str();
        if !has_translatable_body(response.status())
            || response.headers().contains_key(header::CONTENT_RANGE)
        {
            return None;
        }
        let (essence, charset) = content_type(response.headers())?;
        let kind = if essence.eq_ignore_ascii_case("text/html")
            || essence.eq_ignore_ascii_case("application/xhtml+xml")
        {
            html_kind(app, charset)?
        } else if essence.eq_ignore_ascii_case("text/css") {
            css_kind(app, charset)?
        } else {
            return None;
        };
        let coding = match content_coding(response.headers()) {
            Ok(coding) => coding,
            Err(value) => {
                debug!(app, content_encoding = %value, "response body not translated: unsupported content coding");
                return None;
            }
        };
        let Some(links) = LinkTranslation::new(route) else {
            debug!(
                app,
                "response body not translated: the route's URLs cannot be parsed"
            );
            return None;
        };
        Some(Self {
            links: Arc::new(links),
            kind,
            coding,
        })
    }

    fn translator(&self) -> Result<Translator, String> {
        Ok(match self.kind {
            Kind::Html { encoding, declared } => Translator::Html(Box::new(HtmlTranslator::new(
                &self.links,
                encoding,
                declared,
            )?)),
            Kind::Css => Translator::Css(CssTranslator::new(Arc::clone(&self.links))),
        })
    }
}

/// False for responses without a body to translate (`1xx`, `204`, `304`) and for partial
/// content (`206`), whose bytes cannot be translated alone.
fn has_translatable_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// The media type of `Content-Type` and its `charset` parameter, if any.
fn content_type(headers: &HeaderMap) -> Option<(&str, Option<&str>)> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mut parts = value.split(';');
    let essence = parts.next()?.trim();
    let charset = parts.find_map(|parameter| {
        let (name, value) = parameter.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    });
    Some((essence, charset))
}

/// HTML in `charset`, or `None` (logged) when `lol_html` cannot read it.
fn html_kind(app: &str, charset: Option<&str>) -> Option<Kind> {
    let Some(label) = charset else {
        return Some(Kind::Html {
            encoding: AsciiCompatibleEncoding::utf_8(),
            declared: false,
        });
    };
    match Encoding::for_label(label.as_bytes()).and_then(AsciiCompatibleEncoding::new) {
        Some(encoding) => Some(Kind::Html {
            encoding,
            declared: true,
        }),
        None => {
            debug!(
                app,
                charset = label,
                "HTML body not translated: unsupported charset"
            );
            None
        }
    }
}

/// CSS in `charset`, or `None` (logged) when the scanner cannot read it: only UTF-8 and
/// single-byte charsets, where a byte below 0x80 is always that ASCII character.
fn css_kind(app: &str, charset: Option<&str>) -> Option<Kind> {
    let Some(label) = charset else {
        return Some(Kind::Css);
    };
    match Encoding::for_label(label.as_bytes()) {
        Some(encoding)
            if encoding == encoding_rs::UTF_8
                || (encoding.is_single_byte() && encoding.is_ascii_compatible()) =>
        {
            Some(Kind::Css)
        }
        _ => {
            debug!(
                app,
                charset = label,
                "CSS body not translated: unsupported charset"
            );
            None
        }
    }
}

/// A content coding the translator decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    /// zlib, as RFC 9110 says, or raw deflate, as some servers send.
    Deflate,
    Brotli,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
            Self::Brotli => "br",
        }
    }
}

/// The one content coding of `headers` (`None` for none or `identity`), or the header's
/// text when it is one the translator does not decode or several.
fn content_coding(headers: &HeaderMap) -> Result<Option<Coding>, String> {
    let mut codings = Vec::new();
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let text = value
            .to_str()
            .map_err(|_| String::from_utf8_lossy(value.as_bytes()).into_owned())?;
        codings.extend(
            text.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity")),
        );
    }
    let coding = match codings.as_slice() {
        [] => return Ok(None),
        [one] if one.eq_ignore_ascii_case("gzip") || one.eq_ignore_ascii_case("x-gzip") => {
            Coding::Gzip
        }
        [one] if one.eq_ignore_ascii_case("deflate") => Coding::Deflate,
        [one] if one.eq_ignore_ascii_case("br") => Coding::Brotli,
        other => return Err(other.join(", ")),
    };
    Ok(Some(coding))
}

/// Headers that describe the bytes of the backend's body, which translation changes.
const DIGESTS: [HeaderName; 4] = [
    HeaderName::from_static("content-md5"),
    HeaderName::from_static("digest"),
    HeaderName::from_static("content-digest"),
    HeaderName::from_static("repr-digest"),
];

/// The headers of a translated response: see the module documentation.
fn adjust_headers(headers: &mut HeaderMap, decoded: bool) {
    headers.remove(header::CONTENT_LENGTH);
    if decoded {
        headers.remove(header::CONTENT_ENCODING);
    }
    for name in &DIGESTS {
        headers.remove(name);
    }
    if let Some(etag) = headers.get(header::ETAG)
        && !etag.as_bytes().starts_with(b"W/")
    {
        let mut weak = Vec::with_capacity(etag.len() + 2);
        weak.extend_from_slice(b"W/");
        weak.extend_from_slice(etag.as_bytes());
        match HeaderValue::from_bytes(&weak) {
            Ok(weak) => headers.insert(header::ETAG, weak),
            Err(_) => headers.remove(header::ETAG),
        };
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("none"));
}

/// The body of a translated response: the backend's body, decoded when it is compressed,
/// through the translator, one slice of at most [`FEED_CHUNK`] bytes at a time.
pub(crate) struct TranslatedBody {
    /// The app id, for logs.
    app: String,
    source: Source,
    /// Input received and not yet fed to the translator.
    pending: Bytes,
    /// `None` once the translator has finished (or failed).
    translator: Option<Translator>,
    /// The backend's trailers, sent after the last data.
    trailers: Option<HeaderMap>,
    /// The decoder's output buffer, allocated on first use.
    read_buf: Vec<u8>,
    /// The most bytes the body has held at once, input slice and output together.
    high_water: usize,
}

impl TranslatedBody {
    fn new(app: String, source: Source, translator: Translator) -> Self {
        Self {
            app,
            source,
            pending: Bytes::new(),
            translator: Some(translator),
            trailers: None,
            read_buf: Vec::new(),
            high_water: 0,
        }
    }

    /// Ends the body with `error`, logged with the app id.
    fn fail(
        &mut self,
        error: BodyTranslationError,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        warn!(app = %self.app, %error, "translated response body cut short");
        self.translator = None;
        self.trailers = None;
        self.pending = Bytes::new();
        self.source = Source::Done;
        Poll::Ready(Some(Err(Box::new(error))))
    }

    /// The translator's last output, once the input has ended.
    fn finish(&mut self) -> Result<Bytes, BodyTranslationError> {
        match self.translator.take() {
            Some(translator) => translator.end(&self.app),
            None => Ok(Bytes::new()),
        }
    }
}

impl Body for TranslatedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(translator) = this.translator.as_mut() else {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            if !this.pending.is_empty() {
                let input = this.pending.split_to(this.pending.len().min(FEED_CHUNK));
                match translator.write(&input, &this.app) {
                    Ok(output) => {
                        this.high_water = this.high_water.max(input.len() + output.len());
                        if !output.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(output))));
                        }
                        continue;
                    }
                    Err(error) => return this.fail(error),
                }
            }
            let input = ready!(this.source.poll_input(cx, &mut this.read_buf));
            let finished = match input {
                Ok(Input::Data(data)) => {
                    this.pending = data;
                    continue;
                }
                Ok(Input::Trailers(trailers)) => {
                    this.trailers = Some(trailers);
                    this.finish()
                }
                Ok(Input::End) => this.finish(),
                Err(error) => Err(error),
            };
            match finished {
                Ok(output) if !output.is_empty() => {
                    this.high_water = this.high_water.max(output.len());
                    return Poll::Ready(Some(Ok(Frame::data(output))));
                }
                Ok(_) => {}
                Err(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.translator.is_none() && self.trailers.is_none()
    }
}

/// Where a translated body's input comes from.
enum Source {
    /// The backend's body as it is.
    Plain(TunnelBody),
    /// A compressed body before its first two bytes (`head` holds those received): the
    /// decoder is set up on them, so that an empty body (the answer to `HEAD`) ends without
    /// a decoding error and `deflate` can tell zlib from raw deflate.
    Encoded(TunnelBody, Coding, Vec<u8>),
    /// A compressed body, decoded.
    Decoding(Pin<Box<dyn AsyncRead + Send>>, Coding),
    /// Nothing more.
    Done,
}

/// One step of input.
enum Input {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

impl Source {
    fn poll_input(
        &mut self,
        cx: &mut Context<'_>,
        read_buf: &mut Vec<u8>,
    ) -> Poll<Result<Input, BodyTranslationError>> {
        loop {
            match self {
                Self::Plain(body) => {
                    let frame = match ready!(Pin::new(body).poll_frame(cx)) {
                        None => return Poll::Ready(Ok(Input::End)),
                        Some(Err(error)) => {
                            return Poll::Ready(Err(BodyTranslationError::Read(error)));
                        }
                        Some(Ok(frame)) => frame,
                    };
                    match frame.into_data() {
                        Ok(data) => return Poll::Ready(Ok(Input::Data(data))),
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                return Poll::Ready(Ok(Input::Trailers(trailers)));
                            }
                        }
                    }
                }
                Self::Encoded(body, coding, head) => {
                    let coding = *coding;
                    let (data, ended) = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                        None if head.is_empty() => return Poll::Ready(Ok(Input::End)),
                        // Too short to be valid: the decoder says so.
                        None => (Bytes::new(), true),
                        Some(Err(error)) => {
                            return Poll::Ready(Err(BodyTranslationError::Read(error)));
                        }
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => (data, false),
                            Err(frame) => {
                                if let Ok(trailers) = frame.into_trailers() {
                                    return Poll::Ready(Ok(Input::Trailers(trailers)));
                                }
                                continue;
                            }
                        },
                    };
                    let first = if head.is_empty() && data.len() >= 2 {
                        data
                    } else {
                        head.extend_from_slice(&data);
                        if head.len() < 2 && !ended {
                            continue;
                        }
                        Bytes::from(std::mem::take(head))
                    };
                    let body = std::mem::replace(body, sallyport_tunnel::body::empty());
                    *self = Self::Decoding(decoder(coding, first, body), coding);
                }
                Self::Decoding(reader, coding) => {
                    if read_buf.len() != FEED_CHUNK {
                        read_buf.resize(FEED_CHUNK, 0);
                    }
                    let mut buf = ReadBuf::new(read_buf);
                    if let Err(source) = ready!(reader.as_mut().poll_read(cx, &mut buf)) {
                        return Poll::Ready(Err(BodyTranslationError::Decode {
                            coding: coding.name(),
                            source,
                        }));
                    }
                    let filled = buf.filled();
                    if filled.is_empty() {
                        *self = Self::Done;
                        return Poll::Ready(Ok(Input::End));
                    }
                    return Poll::Ready(Ok(Input::Data(Bytes::copy_from_slice(filled))));
                }
                Self::Done => return Poll::Ready(Ok(Input::End)),
            }
        }
    }
}

/// A decoder of `coding` over the body that began with `first` and goes on with `rest`.
fn decoder(coding: Coding, first: Bytes, rest: TunnelBody) -> Pin<Box<dyn AsyncRead + Send>> {
    let zlib = matches!(first.get(..2), Some(&[cmf, flg]) if is_zlib_header(cmf, flg));
    let stream = futures::stream::iter([Ok::<_, BoxError>(first)])
        .chain(rest.into_data_stream())
        .map_err(io::Error::other);
    let reader = StreamReader::new(stream);
    match coding {
        Coding::Gzip => {
            let mut decoder = GzipDecoder::new(reader);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        Coding::Deflate if zlib => Box::pin(ZlibDecoder::new(reader)),
        Coding::Deflate => Box::pin(DeflateDecoder::new(reader)),
        Coding::Brotli => Box::pin(BrotliDecoder::new(reader)),
    }
}

/// True when two bytes open a zlib stream (RFC 1950): deflate, a window of at most 32 KiB,
/// and a valid check.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0f == 8 && cmf >> 4 <= 7 && u16::from_be_bytes([cmf, flg]).is_multiple_of(31)
}

/// Translates one body, chunk by chunk.
enum Translator {
    /// Boxed: the rewriter is large and the CSS translator small.
    Html(Box<HtmlTranslator>),
    Css(CssTranslator),
}

impl Translator {
    /// The output for `input`; `app` is for logs.
    fn write(&mut self, input: &Bytes, app: &str) -> Result<Bytes, BodyTranslationError> {
        match self {
            Self::Html(html) => html.write(input, app),
            Self::Css(css) => Ok(css.write(input)),
        }
    }

    /// The output held back for the end; `app` is for logs.
    fn end(self, app: &str) -> Result<Bytes, BodyTranslationError> {
        match self {
            Self::Html(html) => html.end(app),
            Self::Css(css) => Ok(css.end()),
        }
    }
}

/// The rewriter's output, shared with the translator that drains it after each write.
#[derive(Clone, Default)]
struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl SharedOutput {
    fn take(&self) -> Bytes {
        let mut output = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Bytes::from(std::mem::take(&mut *output))
    }
}

impl OutputSink for SharedOutput {
    fn handle_chunk(&mut self, chunk: &[u8]) {
        if !chunk.is_empty() {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(chunk);
        }
    }
}

/// HTML through `lol_html`.
struct HtmlTranslator {
    /// `None` after a graceful bail-out: the rest passes through as it is.
    rewriter: Option<HtmlRewriter<'static, SharedOutput>>,
    output: SharedOutput,
}

impl HtmlTranslator {
    fn new(
        links: &Arc<LinkTranslation>,
        encoding: AsciiCompatibleEncoding,
        declared: bool,
    ) -> Result<Self, String> {
        let selectors = SELECTORS.as_ref().map_err(Clone::clone)?;
        let memory = MemorySettings::new()
            .with_max_allowed_memory_usage(HTML_MEMORY_LIMIT)
            .with_graceful_bail_out_on_memory_limit_exceeded(true);
        let mut settings = Settings::new_send()
            .with_encoding(encoding)
            .with_adjust_charset_on_meta_tag(!declared)
            // Guess rather than fail on the rare markup whose parsing context the
            // rewriter cannot tell: links are translated, nothing is sanitised.
            .with_strict(false)
            .with_memory_settings(memory)
            .with_graceful_bail_out_on_content_handler_error(true);
        for (selector, (_, rewrite)) in selectors.iter().zip(RULES) {
            let links = Arc::clone(links);
            let handlers = match rewrite {
                Rewrite::StyleElement => {
                    let mut scanner = CssScanner::default();
                    ElementContentHandlers::default().text(move |chunk: &mut TextChunk<'_>| {
                        translate_style_text(chunk, &mut scanner, &links)
                    })
                }
                attribute => ElementContentHandlers::default().element(
                    move |element: &mut Element<'_, '_>| {
                        translate_attribute(element, attribute, &links)
                    },
                ),
            };
            settings = settings.append_element_content_handler((Cow::Borrowed(selector), handlers));
        }
        let output = SharedOutput::default();
        Ok(Self {
            rewriter: Some(HtmlRewriter::new(settings, output.clone())),
            output,
        })
    }

    fn write(&mut self, input: &Bytes, app: &str) -> Result<Bytes, BodyTranslationError> {
        let Some(rewriter) = self.rewriter.as_mut() else {
            return Ok(input.clone());
        };
        if let Err(error) = rewriter.write(input) {
            self.bail_out(error, app)?;
        }
        Ok(self.output.take())
    }

    fn end(mut self, app: &str) -> Result<Bytes, BodyTranslationError> {
        if let Some(rewriter) = self.rewriter.take()
            && let Err(error) = rewriter.end()
        {
            self.bail_out(error, app)?;
        }
        Ok(self.output.take())
    }

    /// After a graceful bail-out (the rewriter has flushed its input as it was), goes on
    /// passing input through; any other error is the body's end.
    fn bail_out(&mut self, error: RewritingError, app: &str) -> Result<(), BodyTranslationError> {
        self.rewriter = None;
        match error {
            RewritingError::MemoryLimitExceeded(_) | RewritingError::ContentHandlerError(_) => {
                debug!(app, %error, "HTML translation stopped; the rest of the body passes through untranslated");
                Ok(())
            }
            error => Err(BodyTranslationError::Html(error)),
        }
    }
}

/// What an HTML rule rewrites.
#[derive(Debug, Clone, Copy)]
enum Rewrite {
    /// The URL in this attribute.
    Url(&'static str),
    /// The URLs of the candidate list in this attribute (`srcset`).
    Srcset(&'static str),
    /// The URL of a `<meta http-equiv="refresh">`'s `content`.
    Refresh,
    /// The CSS in the `style` attribute.
    StyleAttribute,
    /// The CSS of a `<style>` element.
    StyleElement,
}

/// The elements and attributes translated in HTML, by selector.
const RULES: [(&str, Rewrite); 25] = [
    ("a[href]", Rewrite::Url("href")),
    ("area[href]", Rewrite::Url("href")),
    ("link[href]", Rewrite::Url("href")),
    ("base[href]", Rewrite::Url("href")),
    ("img[src]", Rewrite::Url("src")),
    ("script[src]", Rewrite::Url("src")),
    ("iframe[src]", Rewrite::Url("src")),
    ("frame[src]", Rewrite::Url("src")),
    ("embed[src]", Rewrite::Url("src")),
    ("source[src]", Rewrite::Url("src")),
    ("video[src]", Rewrite::Url("src")),
    ("video[poster]", Rewrite::Url("poster")),
    ("audio[src]", Rewrite::Url("src")),
    ("track[src]", Rewrite::Url("src")),
    ("input[src]", Rewrite::Url("src")),
    ("object[data]", Rewrite::Url("data")),
    ("form[action]", Rewrite::Url("action")),
    ("button[formaction]", Rewrite::Url("formaction")),
    ("input[formaction]", Rewrite::Url("formaction")),
    ("img[srcset]", Rewrite::Srcset("srcset")),
    ("source[srcset]", Rewrite::Srcset("srcset")),
    ("link[imagesrcset]", Rewrite::Srcset("imagesrcset")),
    ("meta[http-equiv][content]", Rewrite::Refresh),
    ("[style]", Rewrite::StyleAttribute),
    ("style", Rewrite::StyleElement),
];

/// The selectors of [`RULES`], parsed once.
static SELECTORS: LazyLock<Result<Vec<Selector>, String>> = LazyLock::new(|| {
    RULES
        .iter()
        .map(|(selector, _)| {
            selector
                .parse()
                .map_err(|e| format!("selector {selector:?}: {e}"))
        })
        .collect()
});

/// Translates the attribute `rewrite` names on `element`, when it changes.
fn translate_attribute(
    element: &mut Element<'_, '_>,
    rewrite: Rewrite,
    links: &LinkTranslation,
) -> HandlerResult {
    let (name, translated) = match rewrite {
        Rewrite::Url(name) => (
            name,
            element
                .get_attribute(name)
                .and_then(|value| links.rewrite_url(value.trim_matches(is_html_space))),
        ),
        Rewrite::Srcset(name) => (
            name,
            element
                .get_attribute(name)
                .and_then(|value| translate_srcset(&value, links)),
        ),
        Rewrite::Refresh => {
            let refresh = element
                .get_attribute("http-equiv")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("refresh"));
            let translated = refresh
                .then(|| element.get_attribute("content"))
                .flatten()
                .and_then(|value| links.rewrite_refresh(&value));
            ("content", translated)
        }
        Rewrite::StyleAttribute => (
            "style",
            element
                .get_attribute("style")
                .and_then(|value| translate_css_text(&value, links)),
        ),
        Rewrite::StyleElement => return Ok(()),
    };
    if let Some(translated) = translated {
        element.set_attribute(name, &translated)?;
    }
    Ok(())
}

/// HTML's ASCII whitespace, which URL attributes may carry around their URL.
fn is_html_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0c' | '\r')
}

/// A `srcset` (`url 1x, url 2x`) with its URLs translated; `None` when none changes. The
/// candidates' descriptors and separators are kept as they are.
fn translate_srcset(value: &str, links: &LinkTranslation) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut at = 0;
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\x0c' | b'\r');
    loop {
        while bytes.get(at).is_some_and(|&b| is_space(b) || b == b',') {
            at += 1;
        }
        if at >= bytes.len() {
            break;
        }
        let start = at;
        while bytes.get(at).is_some_and(|&b| !is_space(b)) {
            at += 1;
        }
        let candidate = value.get(start..at)?;
        let url = candidate.trim_end_matches(',');
        if let Some(translated) = links.rewrite_url(url) {
            let out = out.get_or_insert_with(|| String::with_capacity(value.len() + 64));
            out.push_str(value.get(copied..start)?);
            out.push_str(&translated);
            copied = start + url.len();
        }
        if url.len() < candidate.len() {
            // The URL ended with commas: the candidate has no descriptors.
            continue;
        }
        // Descriptors, up to the comma that ends the candidate (not one in parentheses).
        let mut depth = 0usize;
        while let Some(&b) = bytes.get(at) {
            at += 1;
            match b {
                b'(' => depth += 1,
                b')' => depth = depth.saturating_sub(1),
                b',' if depth == 0 => break,
                _ => {}
            }
        }
    }
    let mut out = out?;
    out.push_str(value.get(copied..)?);
    Some(out)
}

/// A whole piece of CSS (a `style` attribute) with its URLs translated; `None` when
/// nothing changes.
fn translate_css_text(css: &str, links: &LinkTranslation) -> Option<String> {
    let mut scanner = CssScanner::default();
    let mut out = Vec::with_capacity(css.len() + 64);
    scanner.feed(links, css.as_bytes(), &mut out);
    scanner.finish(links, &mut out);
    if out == css.as_bytes() {
        return None;
    }
    String::from_utf8(out).ok()
}

/// One chunk of a `<style>` element's text, translated. The scanner may hold back the
/// start of an unfinished token until the next chunk; the last chunk flushes it.
fn translate_style_text(
    chunk: &mut TextChunk<'_>,
    scanner: &mut CssScanner,
    links: &LinkTranslation,
) -> HandlerResult {
    let text = chunk.as_str();
    let mut out = Vec::with_capacity(text.len() + 64);
    scanner.feed(links, text.as_bytes(), &mut out);
    if chunk.last_in_text_node() {
        scanner.finish(links, &mut out);
    }
    if out != text.as_bytes() {
        // The scanner cuts only before ASCII bytes and inserts whole strings.
        let out = String::from_utf8(out)?;
        chunk.replace(&out, ContentType::Html);
    }
    Ok(())
}

/// A CSS stylesheet, through the [`CssScanner`].
struct CssTranslator {
    scanner: CssScanner,
    links: Arc<LinkTranslation>,
    /// Whether the first bytes have been seen.
    started: bool,
    /// Set for a body that starts with a UTF-16 byte order mark: passed as it is.
    passthrough: bool,
}

impl CssTranslator {
    fn new(links: Arc<LinkTranslation>) -> Self {
        Self {
            scanner: CssScanner::default(),
            links,
            started: false,
            passthrough: false,
        }
    }

    fn write(&mut self, input: &Bytes) -> Bytes {
        if !self.started && !input.is_empty() {
            self.started = true;
            // 0xFE and 0xFF never start UTF-8 text; they start UTF-16 byte order marks.
            self.passthrough = matches!(input.first(), Some(0xfe | 0xff));
        }
        if self.passthrough {
            return input.clone();
        }
        let mut out = Vec::with_capacity(input.len() + 64);
        self.scanner.feed(&self.links, input, &mut out);
        Bytes::from(out)
    }

    fn end(mut self) -> Bytes {
        let mut out = Vec::new();
        self.scanner.finish(&self.links, &mut out);
        Bytes::from(out)
    }
}

/// Finds the URLs of CSS `url(...)` and `@import "..."` tokens in text that arrives in
/// chunks, and translates them. It holds back an unfinished token (at most
/// [`MAX_CSS_TOKEN`] bytes) until the next chunk, so the output does not depend on where
/// the chunks are cut.
#[derive(Debug, Default)]
pub(crate) struct CssScanner {
    /// Input held back: the start of a token that may still be one.
    carry: Vec<u8>,
    /// Whether the byte before `carry` (or before the next input) is part of an
    /// identifier, so that `myurl(` is not taken for `url(`.
    after_ident: bool,
}

/// Whether bytes match a token.
enum Scan {
    /// A token whose URL is at `url`, ending at `end` (both relative to its start).
    Token {
        url: Range<usize>,
        end: usize,
        quote: Option<u8>,
    },
    /// Not a token to translate.
    NoMatch,
    /// Maybe one: more bytes are needed.
    Incomplete,
}

impl CssScanner {
    /// Appends the translation of `input` to `out`, except for an unfinished token it holds
    /// back.
    pub(crate) fn feed(&mut self, links: &LinkTranslation, input: &[u8], out: &mut Vec<u8>) {
        self.scan(links, input, false, out);
    }

    /// Appends what was held back to `out`: the input has ended.
    pub(crate) fn finish(&mut self, links: &LinkTranslation, out: &mut Vec<u8>) {
        self.scan(links, &[], true, out);
    }

    /// The bytes held back.
    #[cfg(test)]
    pub(crate) fn held_back(&self) -> usize {
        self.carry.len()
    }

    fn scan(&mut self, links: &LinkTranslation, input: &[u8], at_end: bool, out: &mut Vec<u8>) {
        if self.carry.is_empty() {
            let done = self.process(links, input, at_end, out);
            self.carry
                .extend_from_slice(input.get(done..).unwrap_or_default());
        } else {
            let mut data = std::mem::take(&mut self.carry);
            data.extend_from_slice(input);
            let done = self.process(links, &data, at_end, out);
            data.drain(..done);
            self.carry = data;
        }
    }

    /// Appends the translation of `data` to `out` up to the returned offset; the bytes
    /// from there on are an unfinished token.
    fn process(
        &mut self,
        links: &LinkTranslation,
        data: &[u8],
        at_end: bool,
        out: &mut Vec<u8>,
    ) -> usize {
        let mut copied = 0;
        let mut at = 0;
        while let Some(offset) = data
            .get(at..)
            .and_then(|rest| rest.iter().position(|&b| matches!(b, b'u' | b'U' | b'@')))
        {
            let start = at + offset;
            let rest = data.get(start..).unwrap_or_default();
            let after_ident = match start.checked_sub(1).and_then(|i| data.get(i)) {
                Some(&before) => is_ident_byte(before),
                None => self.after_ident,
            };
            let scan = match rest.first() {
                Some(b'@') => scan_import(rest),
                _ if after_ident => Scan::NoMatch,
                _ => scan_url(rest),
            };
            match scan {
                Scan::Incomplete if !at_end && rest.len() <= MAX_CSS_TOKEN => {
                    out.extend_from_slice(data.get(copied..start).unwrap_or_default());
                    self.after_ident = after_ident;
                    return start;
                }
                Scan::Token { url, end, quote } if end <= MAX_CSS_TOKEN => {
                    let url = start + url.start..start + url.end;
                    if let Some(translated) = data
                        .get(url.clone())
                        .and_then(|u| translate_css_url(links, u, quote))
                    {
                        out.extend_from_slice(data.get(copied..url.start).unwrap_or_default());
                        out.extend_from_slice(translated.as_bytes());
                        copied = url.end;
                    }
                    at = start + end;
                }
                _ => at = start + 1,
            }
        }
        out.extend_from_slice(data.get(copied..).unwrap_or_default());
        if let Some(&last) = data.last() {
            self.after_ident = is_ident_byte(last);
        }
        data.len()
    }
}

/// True for bytes that continue a CSS identifier (non-ASCII bytes included).
fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80
}

/// True for CSS whitespace.
fn is_css_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
}

/// The index of the first non-whitespace byte at or after `at`.
fn skip_css_space(s: &[u8], mut at: usize) -> usize {
    while s.get(at).copied().is_some_and(is_css_space) {
        at += 1;
    }
    at
}

/// Whether `s` starts with `word` (ASCII, any case).
enum Prefix {
    Yes,
    Partial,
    No,
}

fn starts_with_ignore_case(s: &[u8], word: &[u8]) -> Prefix {
    let n = s.len().min(word.len());
    match (s.get(..n), word.get(..n)) {
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => {
            if n == word.len() {
                Prefix::Yes
            } else {
                Prefix::Partial
            }
        }
        _ => Prefix::No,
    }
}

/// Whether `s` starts like a URL that may be internal: `//`, `http://` or `https://`.
fn absolute_prefix(s: &[u8]) -> Prefix {
    let mut partial = false;
    for start in [&b"//"[..], b"http://", b"https://"] {
        match starts_with_ignore_case(s, start) {
            Prefix::Yes => return Prefix::Yes,
            Prefix::Partial => partial = true,
            Prefix::No => {}
        }
    }
    if partial { Prefix::Partial } else { Prefix::No }
}

/// A `url(...)` token at the start of `s`, with a URL that may be internal.
fn scan_url(s: &[u8]) -> Scan {
    match starts_with_ignore_case(s, b"url(") {
        Prefix::Yes => {}
        Prefix::Partial => return Scan::Incomplete,
        Prefix::No => return Scan::NoMatch,
    }
    let mut at = skip_css_space(s, 4);
    let Some(&first) = s.get(at) else {
        return Scan::Incomplete;
    };
    let quote = matches!(first, b'"' | b'\'').then_some(first);
    if quote.is_some() {
        at += 1;
    }
    let start = at;
    let rest = s.get(start..).unwrap_or_default();
    match absolute_prefix(rest) {
        Prefix::Yes => {}
        Prefix::Partial => return Scan::Incomplete,
        Prefix::No => return Scan::NoMatch,
    }
    let Some(len) = rest.iter().position(|&b| match quote {
        Some(q) => b == q || matches!(b, b'\\' | b'\n' | b'\r' | b'\x0c'),
        None => b == b')' || is_css_space(b) || matches!(b, b'"' | b'\'' | b'(' | b'\\'),
    }) else {
        return Scan::Incomplete;
    };
    let end = start + len;
    let close = match (quote, s.get(end)) {
        (Some(q), Some(&b)) if b == q => skip_css_space(s, end + 1),
        (None, Some(&b)) if b == b')' || is_css_space(b) => skip_css_space(s, end),
        _ => return Scan::NoMatch,
    };
    match s.get(close) {
        None => Scan::Incomplete,
        Some(b')') => Scan::Token {
            url: start..end,
            end: close + 1,
            quote,
        },
        Some(_) => Scan::NoMatch,
    }
}

/// An `@import "..."` at the start of `s`, with a URL that may be internal. (`@import
/// url(...)` is left to [`scan_url`].)
fn scan_import(s: &[u8]) -> Scan {
    match starts_with_ignore_case(s, b"@import") {
        Prefix::Yes => {}
        Prefix::Partial => return Scan::Incomplete,
        Prefix::No => return Scan::NoMatch,
    }
    let at = skip_css_space(s, 7);
    let quote = match s.get(at) {
        None => return Scan::Incomplete,
        Some(&q @ (b'"' | b'\'')) => q,
        Some(_) => return Scan::NoMatch,
    };
    let start = at + 1;
    let rest = s.get(start..).unwrap_or_default();
    match absolute_prefix(rest) {
        Prefix::Yes => {}
        Prefix::Partial => return Scan::Incomplete,
        Prefix::No => return Scan::NoMatch,
    }
    match rest
        .iter()
        .position(|&b| b == quote || matches!(b, b'\\' | b'\n' | b'\r' | b'\x0c'))
    {
        None => Scan::Incomplete,
        Some(len) if rest.get(len) == Some(&quote) => Scan::Token {
            url: start..start + len,
            end: start + len + 1,
            quote: Some(quote),
        },
        Some(_) => Scan::NoMatch,
    }
}

/// The translation of a CSS URL, when it is internal and its translation can stand where
/// it was without escapes.
fn translate_css_url(links: &LinkTranslation, url: &[u8], quote: Option<u8>) -> Option<String> {
    let translated = links.rewrite_url(std::str::from_utf8(url).ok()?)?;
    let fits = translated.bytes().all(|b| match quote {
        Some(q) => b != q && !matches!(b, b'\\' | b'\n' | b'\r' | b'\x0c'),
        None => !is_css_space(b) && !matches!(b, b'"' | b'\'' | b'(' | b')' | b'\\'),
    });
    fits.then_some(translated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::fixtures::route;
    use http_body_util::StreamBody;

    fn wiki() -> Route {
        let mut route = route(
            "team-a/wiki",
            "apps.example.com",
            443,
            "/wiki/",
            "http://wiki.corp.internal:8080/w/",
        );
        route.translation.body = true;
        route
    }

    fn links() -> LinkTranslation {
        LinkTranslation::new(&wiki()).unwrap_or_else(|| panic!("wiki's URLs parse"))
    }

    fn css(text: &str) -> String {
        let mut scanner = CssScanner::default();
        let mut out = Vec::new();
        scanner.feed(&links(), text.as_bytes(), &mut out);
        scanner.finish(&links(), &mut out);
        String::from_utf8(out).unwrap_or_else(|e| panic!("{e}"))
    }

    fn css_in_pieces(text: &str, size: usize) -> String {
        let links = links();
        let mut scanner = CssScanner::default();
        let mut out = Vec::new();
        for piece in text.as_bytes().chunks(size) {
            scanner.feed(&links, piece, &mut out);
            assert!(scanner.held_back() <= MAX_CSS_TOKEN + size);
        }
        scanner.finish(&links, &mut out);
        assert_eq!(scanner.held_back(), 0);
        String::from_utf8(out).unwrap_or_else(|e| panic!("{e}"))
    }

    const INTERNAL: &str = "http://wiki.corp.internal:8080/w";
    const EXTERNAL: &str = "https://apps.example.com/wiki";

    #[test]
    fn every_selector_parses() {
        assert!(
            SELECTORS.as_ref().is_ok_and(|s| s.len() == RULES.len()),
            "{:?}",
            SELECTORS.as_ref().err()
        );
    }

    #[test]
    fn css_urls_are_translated_quoted_or_not() {
        let cases = [
            (
                format!("a{{background:url({INTERNAL}/a.png)}}"),
                format!("a{{background:url({EXTERNAL}/a.png)}}"),
            ),
            (
                format!("a{{background:URL( \"{INTERNAL}/a.png\" )}}"),
                format!("a{{background:URL( \"{EXTERNAL}/a.png\" )}}"),
            ),
            (
                format!("a{{b:url('{INTERNAL}/a.png')}}"),
                format!("a{{b:url('{EXTERNAL}/a.png')}}"),
            ),
            (
                format!("a{{b:url(  {INTERNAL}/a.png  )}}"),
                format!("a{{b:url(  {EXTERNAL}/a.png  )}}"),
            ),
            (
                "a{b:url(//wiki.corp.internal:8080/w/x)}".to_owned(),
                format!("a{{b:url({EXTERNAL}/x)}}"),
            ),
            (
                format!("@import \"{INTERNAL}/base.css\";"),
                format!("@import \"{EXTERNAL}/base.css\";"),
            ),
            (
                format!("@IMPORT'{INTERNAL}/base.css' screen;"),
                format!("@IMPORT'{EXTERNAL}/base.css' screen;"),
            ),
            (
                format!("@import url({INTERNAL}/base.css);"),
                format!("@import url({EXTERNAL}/base.css);"),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(css(&input), expected, "{input}");
        }
    }

    #[test]
    fn other_css_stays_as_it_is() {
        for input in [
            "a{b:url(/w/relative.png)}",
            "a{b:url(relative.png)}",
            "a{b:url(\"https://cdn.example.net/x.png\")}",
            "a{b:url(http://wiki.corp.internal:9090/w/x)}",
            "a{b:url(http://wiki.corp.internal:8080/other/x)}",
            "a{b:myurl(http://wiki.corp.internal:8080/w/x)}",
            "a{b:url(http://wiki.corp.internal:8080/w/x\\).png)}",
            "a{b:url(\"http://wiki.corp.internal:8080/w/x\\\".png\")}",
            "a{b:url(data:image/png;base64,AAAA)}",
            "a{b:url(http://wiki.corp.internal:8080/w/x y)}",
            "@import 'relative.css'; @import",
            "a{b:url(http://wiki.corp.internal:8080/w/unterminated",
            "a{content:\"é\u{1F600}\"} u @ @i url",
        ] {
            assert_eq!(css(input), input, "{input}");
        }
    }

    #[test]
    fn css_output_does_not_depend_on_chunk_boundaries() {
        let text = format!(
            "@import \"{INTERNAL}/a.css\";\n@import url('{INTERNAL}/b.css');\n\
             body{{background:url({INTERNAL}/bg.png) no-repeat; x: myurl({INTERNAL}/no)}}\n\
             .é{{content:\"ü\"; b: url( \"//wiki.corp.internal:8080/w/c\" ) }} uu @@import url(rel) ur"
        );
        let whole = css(&text);
        assert!(
            whole.contains(&format!("url({EXTERNAL}/bg.png)")),
            "{whole}"
        );
        assert!(whole.contains(&format!("myurl({INTERNAL}/no)")), "{whole}");
        for size in [1, 2, 3, 5, 7, 64] {
            assert_eq!(css_in_pieces(&text, size), whole, "pieces of {size}");
        }
    }

    #[test]
    fn long_css_tokens_are_bounded_and_pass_unchanged() {
        let long = format!(
            "a{{b:url({INTERNAL}/{})}} c{{d:url({INTERNAL}/x)}}",
            "x".repeat(MAX_CSS_TOKEN)
        );
        let out = css_in_pieces(&long, 1000);
        assert_eq!(out, css(&long));
        assert!(out.starts_with(&format!("a{{b:url({INTERNAL}/")));
        assert!(out.ends_with(&format!("c{{d:url({EXTERNAL}/x)}}")));
        // A data URL is given up at once, however long.
        let data = format!("a{{b:url(data:{})}}", "A".repeat(100_000));
        let mut scanner = CssScanner::default();
        let mut out = Vec::new();
        for piece in data.as_bytes().chunks(100) {
            scanner.feed(&links(), piece, &mut out);
            assert!(scanner.held_back() <= 100);
        }
        scanner.finish(&links(), &mut out);
        assert_eq!(out, data.as_bytes());
    }

    #[test]
    fn srcset_candidates_are_translated_one_by_one() {
        let links = links();
        let value = format!(
            " {INTERNAL}/a.png 1x,/rel.png 2x, {INTERNAL}/b,c.png 480w,https://cdn.example.net/d.png, {INTERNAL}/e.png,, //wiki.corp.internal:8080/w/f.png (max-width: 1px, x) 3x"
        );
        let expected = format!(
            " {EXTERNAL}/a.png 1x,/rel.png 2x, {EXTERNAL}/b,c.png 480w,https://cdn.example.net/d.png, {EXTERNAL}/e.png,, {EXTERNAL}/f.png (max-width: 1px, x) 3x"
        );
        assert_eq!(
            translate_srcset(&value, &links).as_deref(),
            Some(expected.as_str())
        );
        assert_eq!(translate_srcset("/a.png 1x, b.png 2x", &links), None);
        assert_eq!(translate_srcset("", &links), None);
    }

    #[test]
    fn content_codings_are_recognised() {
        let coding = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{e}")),
            );
            content_coding(&headers)
        };
        assert_eq!(coding("gzip"), Ok(Some(Coding::Gzip)));
        assert_eq!(coding("X-Gzip"), Ok(Some(Coding::Gzip)));
        assert_eq!(coding("deflate"), Ok(Some(Coding::Deflate)));
        assert_eq!(coding("br"), Ok(Some(Coding::Brotli)));
        assert_eq!(coding("identity"), Ok(None));
        assert_eq!(coding("zstd"), Err("zstd".to_owned()));
        assert_eq!(coding("gzip, br"), Err("gzip, br".to_owned()));
        assert_eq!(content_coding(&HeaderMap::new()), Ok(None));
        assert!(is_zlib_header(0x78, 0x9c));
        assert!(is_zlib_header(0x78, 0x01));
        assert!(!is_zlib_header(0x1f, 0x8b));
    }

    /// `total` bytes of `unit` repeated, in frames of `frame` bytes, made as they are
    /// polled.
    fn repeated_body(unit: &str, total: usize, frame: usize) -> TunnelBody {
        let period = unit.len();
        let mut pattern = String::with_capacity(frame + period);
        while pattern.len() < frame + period {
            pattern.push_str(unit);
        }
        let pattern = Bytes::from(pattern);
        let frames = (0..total.div_ceil(frame)).map(move |i| {
            let offset = (i * frame) % period;
            let len = frame.min(total - i * frame);
            Ok::<_, BoxError>(Frame::data(pattern.slice(offset..offset + len)))
        });
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_64_mib_page_streams_through_with_bounded_memory() {
        // A unit of 1000 bytes, so that its links fall at every offset of the frames:
        // a link, a relative image, a style attribute and text.
        const UNIT_LEN: usize = 1000;
        const TOTAL: usize = 64 * 1024 * 1024;
        let mut unit = String::from(
            "<p><a href=\"http://wiki.corp.internal:8080/w/page\">x</a>\
             <img src=\"/rel.png\" style=\"b:url(//x)\"> ",
        );
        while unit.len() < UNIT_LEN - 5 {
            unit.push_str("text ");
        }
        unit.truncate(UNIT_LEN - 5);
        unit.push_str("</p>\n");
        assert_eq!(unit.len(), UNIT_LEN);
        let plan = Plan {
            links: Arc::new(links()),
            kind: Kind::Html {
                encoding: AsciiCompatibleEncoding::utf_8(),
                declared: true,
            },
            coding: None,
        };
        let translator = plan.translator().unwrap_or_else(|e| panic!("{e}"));
        let mut body = TranslatedBody::new(
            "team-a/wiki".into(),
            Source::Plain(repeated_body(&unit, TOTAL, 64 * 1024)),
            translator,
        );

        let needle = b"https://apps.example.com/wiki/page";
        let mut tail: Vec<u8> = Vec::new();
        let (mut total, mut found, mut largest) = (0usize, 0usize, 0usize);
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap_or_else(|e| panic!("{e}"));
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len();
            largest = largest.max(data.len());
            tail.extend_from_slice(&data);
            found += tail.windows(needle.len()).filter(|w| w == needle).count();
            let keep = tail.len().min(needle.len() - 1);
            tail.drain(..tail.len() - keep);
        }
        // Every whole unit's link, and the last, cut one's if it got that far.
        let units = TOTAL / UNIT_LEN + usize::from(TOTAL % UNIT_LEN > 60);
        let shrink = "http://wiki.corp.internal:8080/w/page".len() - needle.len();
        assert_eq!(found, units);
        assert_eq!(total, TOTAL - units * shrink);
        assert!(largest <= FEED_CHUNK + 256, "largest frame {largest}");
        assert!(
            body.high_water <= 2 * FEED_CHUNK + 512,
            "held {}",
            body.high_water
        );
    }

    #[tokio::test]
    async fn a_failing_backend_body_ends_the_translated_body_with_an_error() {
        let frames = [
            Ok(Frame::data(Bytes::from_static(
                b"<a href=\"http://wiki.corp.internal:8080/w/x\">",
            ))),
            Err::<Frame<Bytes>, BoxError>("connector lost".into()),
        ];
        let source = StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
        let plan = Plan {
            links: Arc::new(links()),
            kind: Kind::Html {
                encoding: AsciiCompatibleEncoding::utf_8(),
                declared: true,
            },
            coding: None,
        };
        let translator = plan.translator().unwrap_or_else(|e| panic!("{e}"));
        let mut body = TranslatedBody::new("team-a/wiki".into(), Source::Plain(source), translator);
        let mut data = Vec::new();
        let mut error = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    data.extend_from_slice(frame.data_ref().map_or(&b""[..], |d| d.as_ref()))
                }
                Err(e) => error = Some(e),
            }
        }
        assert_eq!(data, b"<a href=\"https://apps.example.com/wiki/x\">");
        let error = error.unwrap_or_else(|| panic!("no error"));
        assert!(
            matches!(
                error.downcast_ref::<BodyTranslationError>(),
                Some(BodyTranslationError::Read(_))
            ),
            "{error}"
        );
        assert!(body.is_end_stream());
    }
}
