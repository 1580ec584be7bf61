// Load generator of scripts/bench-multivm.sh and scripts/bench.py: std-only,
// built with `rustc -O` into the cache directory by those scripts.
//
// loadgen ADDR PATHS BODY CLIENTS SECONDS [CONTENT_TYPE]: keep-alive POSTs
// of BODY (with CONTENT_TYPE, default application/json) for SECONDS from
// CLIENTS threads; client i cycles through the comma-separated PATHS
// starting at i. Prints one JSON line.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn one(r: &mut BufReader<TcpStream>, req: &[u8]) -> std::io::Result<u16> {
    r.get_mut().write_all(req)?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 { return Err(std::io::ErrorKind::UnexpectedEof.into()); }
        let l = line.trim_end();
        if l.is_empty() { break; }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") { len = v.trim().parse().unwrap_or(0); }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (addr, paths, body) = (a[1].clone(), a[2].clone(), a[3].clone());
    let clients: usize = a[4].parse().unwrap();
    let secs: f64 = a[5].parse().unwrap();
    let content_type = a.get(6).cloned().unwrap_or_else(|| "application/json".into());
    let paths: Vec<String> = paths.split(',').map(String::from).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..clients).map(|i| {
        let (addr, paths, body, content_type) = (addr.clone(), paths.clone(), body.clone(), content_type.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut bad = 0u64;
            let mut n = i;
            let mut conn: Option<BufReader<TcpStream>> = None;
            while Instant::now() < end {
                let p = &paths[n % paths.len()];
                n += 1;
                let req = format!("POST {p} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                if conn.is_none() {
                    let s = TcpStream::connect(&addr).expect("connect");
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
                    conn = Some(BufReader::new(s));
                }
                let t = Instant::now();
                match one(conn.as_mut().unwrap(), req.as_bytes()) {
                    Ok(200) => lat.push(t.elapsed().as_micros() as u64),
                    Ok(_) => bad += 1,
                    Err(_) => { bad += 1; conn = None; }
                }
            }
            (lat, bad)
        })
    }).collect();
    let mut lat = Vec::new();
    let mut bad = 0;
    for t in threads { let (l, b) = t.join().unwrap(); lat.extend(l); bad += b; }
    let took = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| if lat.is_empty() { 0 } else { lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1] };
    println!("{{\"clients\":{clients},\"ok\":{},\"errors\":{bad},\"seconds\":{took:.2},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        lat.len(), lat.len() as f64 / took, pct(0.50), pct(0.99), lat.last().copied().unwrap_or(0));
}
