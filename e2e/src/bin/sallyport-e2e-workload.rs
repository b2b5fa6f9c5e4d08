//! `sallyport-e2e-workload`: a trivial program for the e2e node agent's pods.
//!
//! It serves `200 ok` to every HTTP request on `$WORKLOAD_LISTEN` (e.g.
//! `127.0.0.1:8080`), and, when `$WORKLOAD_EXIT_CODE` is set, exits with that code at once
//! instead (a crashing container). SIGTERM ends it, as it ends any process by default.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::ExitCode;

fn main() -> ExitCode {
    if let Ok(code) = std::env::var("WORKLOAD_EXIT_CODE") {
        eprintln!("sallyport-e2e-workload: exiting with {code} as asked");
        return ExitCode::from(code.trim().parse::<u8>().unwrap_or(1));
    }
    let Ok(address) = std::env::var("WORKLOAD_LISTEN") else {
        eprintln!("sallyport-e2e-workload: set WORKLOAD_LISTEN or WORKLOAD_EXIT_CODE");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(&address) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("sallyport-e2e-workload: cannot listen on {address}: {error}");
            return ExitCode::from(3);
        }
    };
    eprintln!("sallyport-e2e-workload: listening on {address}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(&stream);
            // Read the request head up to the empty line, then answer and close.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" || line == "\n" {
                    break;
                }
                line.clear();
            }
            let mut stream = &stream;
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
            );
        });
    }
    ExitCode::SUCCESS
}
