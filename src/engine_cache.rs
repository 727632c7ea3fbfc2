//! Where TensorRT keeps the engines and the timing cache it builds for a
//! model: `state_dir/trt-engines/<model fingerprint>/<TensorRT version>-<GPU>`.
//!
//! An engine is only valid for the model, the TensorRT version and the GPU
//! it was built for, and building one takes minutes on an Orin: keying the
//! directory by all three means a restart reuses it, while a JetPack upgrade
//! or a different module gets a fresh build instead of a load failure. This
//! module finds the key (the TensorRT library's own version call, the GPU's
//! name from the kernel); ONNX Runtime's TensorRT provider
//! ([`crate::engine`]) reads and writes the files.

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};

/// The engine cache directory for `fingerprint` on this machine.
pub fn directory(base: &Path, fingerprint: &str, device_index: i32) -> PathBuf {
    let tensorrt = tensorrt_version().unwrap_or_else(|| "unknown".into());
    let gpu = gpu_name(device_index).unwrap_or_else(|| "unknown".into());
    base.join(slug(fingerprint))
        .join(format!("trt{}-{}", slug(&tensorrt), slug(&gpu)))
}

/// TensorRT's version as `major.minor.patch`, from `getInferLibVersion` of
/// the libnvinfer that the TensorRT provider will load; None without one.
pub fn tensorrt_version() -> Option<String> {
    for name in ["libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"] {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: dlopen/dlsym with valid C strings; the symbol, when
        // present, is TensorRT's `int32_t getInferLibVersion(void)`, which
        // takes no arguments and has no side effects. The handle is kept
        // open: the TensorRT provider loads the same library anyway.
        unsafe {
            let handle = libc::dlopen(cname.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if handle.is_null() {
                continue;
            }
            let sym = libc::dlsym(handle, c"getInferLibVersion".as_ptr() as *const c_char);
            if sym.is_null() {
                continue;
            }
            let f: extern "C" fn() -> c_int = std::mem::transmute(sym);
            return Some(decode_version(f()));
        }
    }
    None
}

/// `getInferLibVersion`'s integer: TensorRT 10 and later encode
/// major*10000 + minor*100 + patch, earlier ones major*1000 + minor*100 +
/// patch.
pub fn decode_version(v: c_int) -> String {
    let v = v.max(0) as u32;
    let (major, minor, patch) = if v >= 100_000 {
        (v / 10_000, (v / 100) % 100, v % 100)
    } else {
        (v / 1000, (v / 100) % 10, v % 100)
    };
    format!("{major}.{minor}.{patch}")
}

/// The GPU's name: a Jetson module's model (device tree), else the
/// `device_index`-th NVIDIA GPU the driver lists.
pub fn gpu_name(device_index: i32) -> Option<String> {
    if let Ok(model) = std::fs::read("/proc/device-tree/model") {
        let model = String::from_utf8_lossy(&model)
            .trim_end_matches('\0')
            .trim()
            .to_string();
        if model.contains("Jetson") || model.contains("NVIDIA") {
            return Some(model);
        }
    }
    let mut gpus: Vec<PathBuf> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    gpus.sort();
    let info = std::fs::read_to_string(
        gpus.get(usize::try_from(device_index).ok()?)?
            .join("information"),
    )
    .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Model:"))
        .map(|m| m.trim().to_string())
}

/// Lower-case letters, digits, '.' and '-' only, neither first nor last;
/// at most 64 characters.
fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(64));
    for c in s.chars() {
        if out.len() >= 64 {
            break;
        }
        match c {
            'a'..='z' | '0'..='9' | '.' => out.push(c),
            'A'..='Z' => out.push(c.to_ascii_lowercase()),
            _ if !out.ends_with('-') && !out.is_empty() => out.push('-'),
            _ => {}
        }
    }
    // No leading dot: a key is never `.` or `..`.
    let out = out.trim_matches(|c| c == '-' || c == '.').to_string();
    if out.is_empty() {
        "unknown".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_versions_decode_for_both_encodings() {
        assert_eq!(decode_version(8502), "8.5.2");
        assert_eq!(decode_version(8601), "8.6.1");
        assert_eq!(decode_version(100300), "10.3.0");
        assert_eq!(decode_version(101301), "10.13.1");
    }

    #[test]
    fn the_key_separates_models_tensorrt_versions_and_gpus() {
        let base = Path::new("/var/lib/retail-agent/trt-engines");
        let key = |fp: &str, trt: &str, gpu: &str| {
            base.join(slug(fp))
                .join(format!("trt{}-{}", slug(trt), slug(gpu)))
        };
        let a = key(
            "sha256:ab12",
            "8.5.2",
            "NVIDIA Jetson Orin Nano Developer Kit",
        );
        assert_eq!(
            a,
            base.join("sha256-ab12")
                .join("trt8.5.2-nvidia-jetson-orin-nano-developer-kit")
        );
        assert_ne!(
            a,
            key(
                "sha256:ab13",
                "8.5.2",
                "NVIDIA Jetson Orin Nano Developer Kit"
            )
        );
        assert_ne!(
            a,
            key(
                "sha256:ab12",
                "8.6.1",
                "NVIDIA Jetson Orin Nano Developer Kit"
            )
        );
        assert_ne!(a, key("sha256:ab12", "8.5.2", "NVIDIA Jetson AGX Orin"));
    }

    #[test]
    fn slugs_stay_short_and_path_safe() {
        assert_eq!(slug("../../etc"), "etc");
        assert_eq!(slug(".."), "unknown");
        assert!(!slug("a/b\\c d").contains(['/', '\\', ' ']));
        assert_eq!(slug(""), "unknown");
        assert!(slug(&"x".repeat(500)).len() <= 64);
    }

    #[test]
    fn without_tensorrt_here_the_directory_says_unknown() {
        // This machine has no TensorRT; the key must still be a usable path.
        let d = directory(Path::new("/tmp/cache"), "abc", 0);
        assert!(d.starts_with("/tmp/cache/abc"));
        if tensorrt_version().is_none() {
            assert!(d.to_string_lossy().contains("trtunknown-"));
        }
    }
}
