//! The provider API's request parsers (multivm `/system/*` bodies, which
//! anyone who can reach the port may send). The first input byte picks
//! what the rest is (`% 4`):
//! - 0: a FunctionDeployment (POST/PUT /system/functions), parsed, checked
//!   and planned; whatever parses must serialize and parse back equal,
//!   and a plan's image must be a plain relative path;
//! - 1: a ScaleServiceRequest; 2: a DeleteFunctionRequest;
//! - 3: an `image` path and a memory quantity, checked alone.

#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;
use snapvm::multivm::provider::types::{
    check_image, parse_json, parse_memory, DeleteFunctionRequest, FunctionDeployment,
    ScaleServiceRequest,
};

fn plain_relative(p: &std::path::Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let Ok(d) = FunctionDeployment::parse(rest) else {
                return;
            };
            let again = serde_json::to_vec(&d).expect("a parsed deployment serializes");
            let back = FunctionDeployment::parse(&again)
                .unwrap_or_else(|e| panic!("a re-serialized deployment does not parse: {e}"));
            assert_eq!(back, d);
            if let Ok(plan) = d.plan(Some("testguest")) {
                assert!(plain_relative(&plan.image), "{:?}", plan.image);
                assert!(!plan.runtime.is_empty());
            }
        }
        1 => {
            let _ = parse_json::<ScaleServiceRequest>("ScaleServiceRequest", rest);
        }
        2 => {
            let _ = parse_json::<DeleteFunctionRequest>("DeleteFunctionRequest", rest);
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(p) = check_image(&text) {
                assert!(plain_relative(&p) && !text.contains('\0'), "{text:?}");
            }
            let _ = parse_memory(&text);
        }
    }
});
