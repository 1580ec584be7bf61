//! CPU templates: a JSON file (`firerunner --cpu_template FILE`) that edits
//! the CPUID a guest sees and overrides MSRs at boot, the way Firecracker's
//! custom CPU templates do. Used to hide a feature from the guest (e.g.
//! `resources/cpu-templates/no-cx16.json` clears CMPXCHG16B) or to give
//! every host of a fleet the same CPU model.
//!
//! ```json
//! {
//!   "description": "free text, optional",
//!   "cpuid": [
//!     { "leaf": "0x1", "subleaf": 0, "register": "ecx",
//!       "clear": [13], "set": [], "comment": "optional" }
//!   ],
//!   "msrs": [
//!     { "index": "0x1a0", "value": "0x1", "comment": "optional" }
//!   ]
//! }
//! ```
//!
//! - `leaf`, `subleaf`, `index` and `value` are JSON numbers or strings
//!   (`"0x1a0"` or `"416"`); `subleaf` defaults to 0 and is ignored for
//!   leaves whose subleaf KVM does not distinguish (e.g. leaf 1).
//! - `register` is one of `eax`, `ebx`, `ecx`, `edx`; `set` and `clear` list
//!   bit numbers 0..=31 (either may be omitted).
//! - Edits apply after firerunner's own CPUID fix-ups (topology, hypervisor
//!   bit), so the template has the last word; MSR overrides are written
//!   after the boot MSRs.
//! - A template is validated before anything runs: bad JSON, an unknown
//!   field or register, a bit out of range, a bit both set and cleared, an
//!   MSR given two values, a leaf this host's KVM does not report, or an MSR
//!   KVM refuses — each is an error that names the culprit.
//! - Setting a bit the host's KVM does not support is allowed but is the
//!   template author's responsibility: KVM may not honour it.
//! - A snapshot keeps the CPUID and MSRs its vCPUs had, so a VM restored
//!   from it sees the template it was booted with.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    #[error("cannot read CPU template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CPU template {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("CPU template: {what} {value:?} is not a number (write e.g. 26 or \"0x1a\")")]
    Number { what: &'static str, value: String },
    #[error("CPU template: {what} {value:#x} does not fit in {bits} bits")]
    TooLarge {
        what: &'static str,
        value: u64,
        bits: u32,
    },
    #[error(
        "CPU template: bit {bit} of CPUID leaf {leaf:#x} subleaf {subleaf:#x} {register} \
         does not exist (registers have bits 0..=31)"
    )]
    BitOutOfRange {
        leaf: u32,
        subleaf: u32,
        register: Register,
        bit: u32,
    },
    #[error(
        "CPU template both sets and clears bits {bits:#x} of CPUID leaf {leaf:#x} subleaf \
         {subleaf:#x} {register}"
    )]
    Conflict {
        leaf: u32,
        subleaf: u32,
        register: Register,
        bits: u32,
    },
    #[error("CPU template gives MSR {index:#x} two different values ({first:#x} and {second:#x})")]
    MsrConflict { index: u32, first: u64, second: u64 },
    #[error(
        "CPU template edits CPUID leaf {leaf:#x} subleaf {subleaf:#x}, which this host's KVM \
         does not report; a template can only edit leaves the host has"
    )]
    LeafMissing { leaf: u32, subleaf: u32 },
    #[error("cannot build the CPU template's MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl fmt::Display for Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Register::Eax => "eax",
            Register::Ebx => "ebx",
            Register::Ecx => "ecx",
            Register::Edx => "edx",
        })
    }
}

impl Register {
    fn of(self, e: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Register::Eax => &mut e.eax,
            Register::Ebx => &mut e.ebx,
            Register::Ecx => &mut e.ecx,
            Register::Edx => &mut e.edx,
        }
    }
}

/// A number as JSON allows us to write it: `26`, `"26"` or `"0x1a"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Int(u64),
    Text(String),
}

impl Number {
    fn value(&self, what: &'static str) -> Result<u64, CpuTemplateError> {
        match self {
            Number::Int(v) => Ok(*v),
            Number::Text(s) => {
                let t = s.trim();
                let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                    None => t.replace('_', "").parse(),
                };
                parsed.map_err(|_| CpuTemplateError::Number {
                    what,
                    value: s.clone(),
                })
            }
        }
    }

    fn value_u32(&self, what: &'static str) -> Result<u32, CpuTemplateError> {
        let v = self.value(what)?;
        u32::try_from(v).map_err(|_| CpuTemplateError::TooLarge {
            what,
            value: v,
            bits: 32,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCpuid {
    leaf: Number,
    subleaf: Option<Number>,
    register: Register,
    #[serde(default)]
    set: Vec<u32>,
    #[serde(default)]
    clear: Vec<u32>,
    #[serde(default, rename = "comment")]
    _comment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMsr {
    index: Number,
    value: Number,
    #[serde(default, rename = "comment")]
    _comment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTemplate {
    #[serde(default, rename = "description")]
    _description: Option<String>,
    #[serde(default)]
    cpuid: Vec<FileCpuid>,
    #[serde(default)]
    msrs: Vec<FileMsr>,
}

/// The bits a template sets and clears in one CPUID register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitEdit {
    pub set: u32,
    pub clear: u32,
}

/// A validated CPU template. The default template changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    /// (leaf, subleaf, register) → the merged edits of every entry for it.
    cpuid: BTreeMap<(u32, u32, Register), BitEdit>,
    /// MSR index → value, in index order.
    msrs: BTreeMap<u32, u64>,
}

impl CpuTemplate {
    /// Reads and validates the template at `path`.
    pub fn from_file(path: &Path) -> Result<Self, CpuTemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| CpuTemplateError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and validates a template; `path` only names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, CpuTemplateError> {
        let file: FileTemplate =
            serde_json::from_str(text).map_err(|source| CpuTemplateError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let mut t = CpuTemplate::default();
        for e in &file.cpuid {
            let leaf = e.leaf.value_u32("leaf")?;
            let subleaf = match &e.subleaf {
                Some(s) => s.value_u32("subleaf")?,
                None => 0,
            };
            let mask = |bits: &[u32]| -> Result<u32, CpuTemplateError> {
                bits.iter().try_fold(0u32, |m, &bit| {
                    if bit > 31 {
                        Err(CpuTemplateError::BitOutOfRange {
                            leaf,
                            subleaf,
                            register: e.register,
                            bit,
                        })
                    } else {
                        Ok(m | (1 << bit))
                    }
                })
            };
            let (set, clear) = (mask(&e.set)?, mask(&e.clear)?);
            let edit = t.cpuid.entry((leaf, subleaf, e.register)).or_default();
            edit.set |= set;
            edit.clear |= clear;
            if edit.set & edit.clear != 0 {
                return Err(CpuTemplateError::Conflict {
                    leaf,
                    subleaf,
                    register: e.register,
                    bits: edit.set & edit.clear,
                });
            }
        }
        for m in &file.msrs {
            let index = m.index.value_u32("MSR index")?;
            let value = m.value.value("MSR value")?;
            if let Some(&first) = t.msrs.get(&index) {
                if first != value {
                    return Err(CpuTemplateError::MsrConflict {
                        index,
                        first,
                        second: value,
                    });
                }
            }
            t.msrs.insert(index, value);
        }
        Ok(t)
    }

    /// Whether the template changes nothing.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.cpuid.is_empty() && self.msrs.is_empty()
    }

    /// The CPUID edits, by (leaf, subleaf, register).
    pub fn cpuid_edits(&self) -> impl Iterator<Item = (u32, u32, Register, BitEdit)> + '_ {
        self.cpuid.iter().map(|(&(l, s, r), &e)| (l, s, r, e))
    }

    /// Checks that every leaf the template edits is in `cpuid` (e.g. KVM's
    /// supported set), so a template that cannot apply fails before any
    /// vCPU exists.
    pub fn check_leaves(&self, cpuid: &CpuId) -> Result<(), CpuTemplateError> {
        for &(leaf, subleaf, _) in self.cpuid.keys() {
            if !cpuid.as_slice().iter().any(|e| matches(e, leaf, subleaf)) {
                return Err(CpuTemplateError::LeafMissing { leaf, subleaf });
            }
        }
        Ok(())
    }

    /// Applies the CPUID edits to `cpuid` (one vCPU's, after the fix-ups).
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) -> Result<(), CpuTemplateError> {
        self.check_leaves(cpuid)?;
        for e in cpuid.as_mut_slice() {
            for (&(leaf, subleaf, register), edit) in &self.cpuid {
                if matches(e, leaf, subleaf) {
                    let r = register.of(e);
                    *r = (*r & !edit.clear) | edit.set;
                }
            }
        }
        Ok(())
    }

    /// The MSR overrides, in index order.
    pub fn msrs(&self) -> Vec<kvm_msr_entry> {
        self.msrs
            .iter()
            .map(|(&index, &data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect()
    }

    /// The MSR overrides as a KVM_SET_MSRS list.
    pub fn msr_list(&self) -> Result<Msrs, CpuTemplateError> {
        Msrs::from_entries(&self.msrs()).map_err(CpuTemplateError::MsrList)
    }
}

/// Whether CPUID entry `e` answers `leaf`/`subleaf`: the subleaf counts only
/// where KVM says it does.
fn matches(e: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<CpuTemplate, CpuTemplateError> {
        CpuTemplate::from_json(json, Path::new("t.json"))
    }

    fn cpuid() -> CpuId {
        let e = |function, index, flags, v| kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: v,
            ebx: v,
            ecx: v,
            edx: v,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0x1, 0, 0, 0x0000_2000),
            e(0x7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0xffff_ffff),
            e(0x7, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0),
        ])
        .unwrap()
    }

    #[test]
    fn clears_and_sets_bits_after_parsing_numbers_in_every_spelling() {
        let t = parse(
            r#"{
                "description": "test",
                "cpuid": [
                    {"leaf": "0x1", "register": "ecx", "clear": [13], "set": [0, 31],
                     "comment": "cx16 off"},
                    {"leaf": 7, "subleaf": "1", "register": "ebx", "set": [3]},
                    {"leaf": "0X7", "subleaf": "0x0", "register": "edx", "clear": [0, 1]}
                ],
                "msrs": [{"index": "0x1a0", "value": 1}, {"index": 16, "value": "0x10"}]
            }"#,
        )
        .unwrap();
        let mut c = cpuid();
        t.apply_cpuid(&mut c).unwrap();
        let s = c.as_slice();
        assert_eq!(s[0].ecx, 0x8000_0001);
        assert_eq!(s[0].edx, 0x2000, "other registers untouched");
        assert_eq!(s[1].edx, 0xffff_fffc);
        assert_eq!(s[1].ebx, 0xffff_ffff);
        assert_eq!(s[2].ebx, 0x8);
        let msrs: Vec<(u32, u64)> = t.msrs().iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(msrs, vec![(0x10, 0x10), (0x1a0, 1)]);
        assert_eq!(t.msr_list().unwrap().as_slice().len(), 2);
        assert!(!t.is_empty());
    }

    #[test]
    fn subleaf_is_ignored_where_kvm_does_not_index() {
        // Leaf 1 has no significant index: subleaf 5 still reaches it.
        let t =
            parse(r#"{"cpuid": [{"leaf": 1, "subleaf": 5, "register": "ecx", "clear": [13]}]}"#)
                .unwrap();
        let mut c = cpuid();
        t.apply_cpuid(&mut c).unwrap();
        assert_eq!(c.as_slice()[0].ecx, 0);
    }

    #[test]
    fn empty_template_changes_nothing() {
        let t = parse("{}").unwrap();
        assert!(t.is_empty());
        let mut c = cpuid();
        t.apply_cpuid(&mut c).unwrap();
        assert_eq!(c, cpuid());
        assert_eq!(t, CpuTemplate::default());
    }

    #[test]
    fn bad_json_names_the_file_and_position() {
        let e = parse(r#"{"cpuid": [}"#).unwrap_err();
        assert!(matches!(e, CpuTemplateError::Parse { .. }));
        let msg = e.to_string();
        assert!(msg.contains("t.json") && msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn unknown_register_and_fields_are_refused() {
        let e = parse(r#"{"cpuid": [{"leaf": 1, "register": "exx", "clear": [1]}]}"#).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("exx") && msg.contains("eax"), "{msg}");
        let e = parse(r#"{"cpuid": [{"leaf": 1, "register": "ecx", "clr": [1]}]}"#).unwrap_err();
        assert!(e.to_string().contains("clr"), "{e}");
        let e = parse(r#"{"cpu_id": []}"#).unwrap_err();
        assert!(e.to_string().contains("cpu_id"), "{e}");
    }

    #[test]
    fn bad_numbers_are_refused() {
        let e = parse(r#"{"cpuid": [{"leaf": "0xz", "register": "ecx"}]}"#).unwrap_err();
        assert!(
            matches!(e, CpuTemplateError::Number { what: "leaf", .. }),
            "{e}"
        );
        let e = parse(r#"{"cpuid": [{"leaf": "0x100000000", "register": "ecx"}]}"#).unwrap_err();
        assert!(matches!(e, CpuTemplateError::TooLarge { .. }), "{e}");
        let e = parse(r#"{"cpuid": [{"leaf": 1, "register": "ecx", "set": [32]}]}"#).unwrap_err();
        assert!(
            matches!(e, CpuTemplateError::BitOutOfRange { bit: 32, .. }),
            "{e}"
        );
        let e = parse(r#"{"msrs": [{"index": 1, "value": -1}]}"#).unwrap_err();
        assert!(matches!(e, CpuTemplateError::Parse { .. }), "{e}");
    }

    #[test]
    fn conflicting_bits_are_refused_within_and_across_entries() {
        let e =
            parse(r#"{"cpuid": [{"leaf": 1, "register": "ecx", "set": [3, 4], "clear": [4]}]}"#)
                .unwrap_err();
        assert!(
            matches!(
                e,
                CpuTemplateError::Conflict {
                    leaf: 1,
                    bits: 0x10,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(
            r#"{"cpuid": [{"leaf": 1, "register": "ecx", "set": [5]},
                          {"leaf": "0x1", "subleaf": 0, "register": "ecx", "clear": [5]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("sets and clears bits 0x20"), "{e}");
        // The same bit in two registers is no conflict.
        parse(
            r#"{"cpuid": [{"leaf": 1, "register": "ecx", "set": [5]},
                          {"leaf": 1, "register": "edx", "clear": [5]}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn msr_given_two_values_is_refused() {
        let e = parse(r#"{"msrs": [{"index": 16, "value": 1}, {"index": "0x10", "value": 2}]}"#)
            .unwrap_err();
        assert!(
            matches!(
                e,
                CpuTemplateError::MsrConflict {
                    index: 0x10,
                    first: 1,
                    second: 2
                }
            ),
            "{e}"
        );
        // The same value twice is fine.
        parse(r#"{"msrs": [{"index": 16, "value": 1}, {"index": 16, "value": "1"}]}"#).unwrap();
    }

    #[test]
    fn leaf_not_present_is_refused() {
        let t =
            parse(r#"{"cpuid": [{"leaf": "0x40000000", "register": "eax", "set": [0]}]}"#).unwrap();
        let e = t.check_leaves(&cpuid()).unwrap_err();
        assert!(
            matches!(
                e,
                CpuTemplateError::LeafMissing {
                    leaf: 0x4000_0000,
                    subleaf: 0
                }
            ),
            "{e}"
        );
        // An indexed leaf with a subleaf KVM does not report.
        let t = parse(r#"{"cpuid": [{"leaf": 7, "subleaf": 2, "register": "eax", "set": [0]}]}"#)
            .unwrap();
        let mut c = cpuid();
        assert!(t.apply_cpuid(&mut c).is_err());
        assert_eq!(c, cpuid(), "nothing applied");
    }

    #[test]
    fn shipped_templates_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cpu-templates");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                CpuTemplate::from_file(&path).unwrap();
                n += 1;
            }
        }
        assert!(n > 0, "no templates in {}", dir.display());
        let t = CpuTemplate::from_file(&dir.join("no-cx16.json")).unwrap();
        let edits: Vec<_> = t.cpuid_edits().collect();
        assert_eq!(
            edits,
            vec![(
                1,
                0,
                Register::Ecx,
                BitEdit {
                    set: 0,
                    clear: 1 << 13
                }
            )]
        );
    }
}
