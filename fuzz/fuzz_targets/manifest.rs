//! The manifest parser: any bytes either parse to a manifest that survives a round trip
//! (serialise, parse again, equal) or are refused with an error; never a panic.
#![no_main]

use deploy_protocol::PackageManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = PackageManifest::from_slice(data) {
        let bytes = manifest.to_bytes();
        let again = PackageManifest::from_slice(&bytes).expect("a parsed manifest re-parses");
        assert_eq!(again, manifest);
    }
});
