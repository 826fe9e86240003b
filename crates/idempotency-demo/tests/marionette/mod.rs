//! A small client of Firefox's Marionette protocol, enough to drive a page from a test.
//!
//! The protocol (Firefox source docs, `remote/doc/marionette/Protocol.md`): once connected, the
//! server sends a handshake `{"applicationType": "gecko", "marionetteProtocol": 3}`. Every
//! message is then a JSON array prefixed by its length in bytes and a colon
//! (`42:[0,1,"WebDriver:Navigate",{...}]`). A command is `[0, id, name, parameters]`; its
//! response is `[1, id, error, result]`, where `error` is `null` or an object with `error`,
//! `message` and `stacktrace`. Command names and parameters are WebDriver's, prefixed
//! `WebDriver:`. Responses may come in any order, so each one is matched to its command by id.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::fmt;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The key under which WebDriver serialises an element reference.
pub const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// No message of the protocol comes near this; a larger length prefix is a broken stream.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// How long one command may take before the client gives up on the browser.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    /// The peer broke the protocol: a bad frame, bad JSON, a bad handshake, a timeout.
    Protocol(String),
    /// The command failed in the browser (a WebDriver error such as `no such element`).
    WebDriver {
        error: String,
        message: String,
    },
}

impl Error {
    /// The WebDriver error code, if the browser answered with one.
    pub fn webdriver_error(&self) -> Option<&str> {
        match self {
            Error::WebDriver { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "marionette connection: {e}"),
            Error::Protocol(why) => write!(f, "marionette protocol: {why}"),
            Error::WebDriver { error, message } => write!(f, "{error}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A connection to a Marionette server.
pub struct Marionette {
    stream: BufReader<TcpStream>,
    last_id: u32,
}

/// A reference to an element of the current page.
#[derive(Debug, Clone)]
pub struct Element(pub String);

impl Marionette {
    /// Connects, and checks the server's handshake.
    pub async fn connect(port: u16) -> Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let mut client = Self {
            stream: BufReader::new(stream),
            last_id: 0,
        };
        let hello = client.read_message().await?;
        if hello["applicationType"] != "gecko" || hello["marionetteProtocol"] != 3 {
            return Err(Error::Protocol(format!("unexpected handshake {hello}")));
        }
        Ok(client)
    }

    /// Sends one command and waits for its result.
    pub async fn command(&mut self, name: &str, params: Value) -> Result<Value> {
        self.last_id = self.last_id.wrapping_add(1);
        let id = self.last_id;
        let message = serde_json::to_vec(&json!([0, id, name, params]))
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let mut frame = format!("{}:", message.len()).into_bytes();
        frame.extend_from_slice(&message);
        let exchange = async {
            self.stream.get_mut().write_all(&frame).await?;
            loop {
                let reply = self.read_message().await?;
                // Anything but the response to this command (a late response to an earlier one)
                // is not ours to answer.
                if reply[0] == 1 && reply[1] == id {
                    return Self::result(name, reply);
                }
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::Protocol(format!("{name}: no answer in {COMMAND_TIMEOUT:?}")))?
    }

    fn result(name: &str, mut reply: Value) -> Result<Value> {
        let error = reply[2].take();
        if error.is_null() {
            return Ok(reply[3].take());
        }
        let text = |field: &str| error[field].as_str().unwrap_or_default().to_owned();
        Err(Error::WebDriver {
            error: text("error"),
            message: format!("{name}: {}", text("message")),
        })
    }

    /// One length-prefixed JSON message.
    async fn read_message(&mut self) -> Result<Value> {
        let mut len: usize = 0;
        let mut digits = 0;
        loop {
            let byte = self.stream.read_u8().await?;
            match byte {
                b'0'..=b'9' if digits < 10 => {
                    len = len * 10 + usize::from(byte - b'0');
                    digits += 1;
                }
                b':' if digits > 0 => break,
                other => {
                    return Err(Error::Protocol(format!(
                        "bad length prefix (byte {other:#04x})"
                    )));
                }
            }
        }
        if len > MAX_MESSAGE {
            return Err(Error::Protocol(format!("a message of {len} bytes")));
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await?;
        serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("bad JSON: {e}")))
    }

    /// Starts the WebDriver session.
    pub async fn new_session(&mut self) -> Result<Value> {
        self.command(
            "WebDriver:NewSession",
            json!({ "capabilities": { "alwaysMatch": { "pageLoadStrategy": "normal" } } }),
        )
        .await
    }

    /// Loads `url` and waits for the page.
    pub async fn navigate(&mut self, url: &str) -> Result<()> {
        self.command("WebDriver:Navigate", json!({ "url": url }))
            .await
            .map(drop)
    }

    /// The URL of the page shown.
    pub async fn current_url(&mut self) -> Result<String> {
        let v = self.command("WebDriver:GetCurrentURL", json!({})).await?;
        Ok(v["value"].as_str().unwrap_or_default().to_owned())
    }

    /// The first element matching a CSS selector; `None` if there is none.
    pub async fn find(&mut self, css: &str) -> Result<Option<Element>> {
        let found = self
            .command(
                "WebDriver:FindElement",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        match found {
            Ok(v) => match v["value"][ELEMENT_KEY].as_str() {
                Some(id) => Ok(Some(Element(id.to_owned()))),
                None => Err(Error::Protocol(format!("no element reference in {v}"))),
            },
            Err(e) if e.webdriver_error() == Some("no such element") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// An element's DOM property (`value` of an input, say).
    pub async fn property(&mut self, element: &Element, name: &str) -> Result<Value> {
        let v = self
            .command(
                "WebDriver:GetElementProperty",
                json!({ "id": element.0, "name": name }),
            )
            .await?;
        Ok(v["value"].clone())
    }

    /// An element's attribute, if it has it.
    pub async fn attribute(&mut self, element: &Element, name: &str) -> Result<Option<String>> {
        let v = self
            .command(
                "WebDriver:GetElementAttribute",
                json!({ "id": element.0, "name": name }),
            )
            .await?;
        Ok(v["value"].as_str().map(str::to_owned))
    }

    /// An element's rendered text.
    pub async fn text(&mut self, element: &Element) -> Result<String> {
        let v = self
            .command("WebDriver:GetElementText", json!({ "id": element.0 }))
            .await?;
        Ok(v["value"].as_str().unwrap_or_default().to_owned())
    }

    /// Two clicks of the left mouse button on the middle of `element`, `pause` apart, as a
    /// person double-clicks a button.
    pub async fn double_click(&mut self, element: &Element, pause: Duration) -> Result<()> {
        let origin = json!({ ELEMENT_KEY: element.0 });
        let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        let actions = json!([{
            "type": "pointer",
            "id": "mouse",
            "parameters": { "pointerType": "mouse" },
            "actions": [
                { "type": "pointerMove", "origin": origin, "x": 0, "y": 0 },
                { "type": "pointerDown", "button": 0 },
                { "type": "pointerUp", "button": 0 },
                { "type": "pause", "duration": pause_ms },
                { "type": "pointerDown", "button": 0 },
                { "type": "pointerUp", "button": 0 },
            ],
        }]);
        self.command("WebDriver:PerformActions", json!({ "actions": actions }))
            .await?;
        self.command("WebDriver:ReleaseActions", json!({}))
            .await
            .map(drop)
    }

    /// Runs `script` in the page as an async function body: it finishes by calling its last
    /// argument with the result.
    pub async fn execute_async(&mut self, script: &str, args: Value) -> Result<Value> {
        let v = self
            .command(
                "WebDriver:ExecuteAsyncScript",
                json!({ "script": script, "args": args }),
            )
            .await?;
        Ok(v["value"].clone())
    }

    /// Asks the browser to quit, which ends the session (Marionette refuses to quit a browser
    /// whose session was deleted first).
    pub async fn quit(mut self) -> Result<()> {
        self.command("Marionette:Quit", json!({ "flags": ["eForceQuit"] }))
            .await
            .map(drop)
    }
}
