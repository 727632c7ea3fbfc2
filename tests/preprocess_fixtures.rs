//! Preprocessing checked against values computed independently in Python
//! (scripts/gen_preprocess_fixture.py, with Pillow and float64 arithmetic).

mod common;

use retail_agent::manifest::{ColorOrder, Preprocess, ResizeFilter, ResizeMode};
use retail_agent::vision::preprocess::{InputGeometry, Preprocessor};
use serde::Deserialize;

fn fixture(name: &str) -> std::path::PathBuf {
    common::repo_path("tests/fixtures/preprocess").join(name)
}

fn load_rgb(name: &str) -> image::RgbImage {
    image::open(fixture(name)).expect("fixture image").to_rgb8()
}

#[derive(Deserialize)]
struct ExactFile {
    image: String,
    configs: Vec<ExactConfig>,
}

#[derive(Deserialize)]
struct ExactConfig {
    name: String,
    color_order: ColorOrder,
    scale: f32,
    mean: [f32; 3],
    std: [f32; 3],
    samples: Vec<(usize, usize, usize, f64)>,
}

#[test]
fn channel_order_scale_and_mean_std_match_the_reference_to_1e_5() {
    let file: ExactFile =
        serde_json::from_slice(&std::fs::read(fixture("exact_224.json")).unwrap()).unwrap();
    let img = load_rgb(&file.image);
    assert_eq!(
        img.dimensions(),
        (224, 224),
        "the exact fixture needs no resize"
    );
    for cfg in file.configs {
        let mut pre = Preprocessor::new(InputGeometry {
            width: 224,
            height: 224,
            preprocess: Preprocess {
                color_order: cfg.color_order,
                scale: cfg.scale,
                mean: cfg.mean,
                std: cfg.std,
                resize: ResizeMode::Stretch,
                filter: ResizeFilter::Bilinear,
            },
        });
        let mut rgb = Vec::new();
        let mut tensor = vec![0f32; 3 * 224 * 224];
        pre.prepare(&img, None, &mut rgb, &mut tensor).unwrap();
        let mut worst = 0f64;
        for (c, y, x, expected) in &cfg.samples {
            let got = f64::from(tensor[c * 224 * 224 + y * 224 + x]);
            worst = worst.max((got - expected).abs());
        }
        assert!(cfg.samples.len() >= 600);
        assert!(worst < 1e-5, "{}: worst difference {worst:e}", cfg.name);
    }
}

#[derive(Deserialize)]
struct ResizeFile {
    cases: Vec<ResizeCase>,
}

#[derive(Deserialize)]
struct ResizeCase {
    src: String,
    width: u32,
    height: u32,
    mode: String,
    #[serde(default)]
    ratio: Option<f32>,
    crop: Option<[u32; 4]>,
    expected: String,
}

#[test]
fn default_resize_reproduces_pillows_antialiased_bilinear_on_crops_of_many_sizes() {
    let file: ResizeFile =
        serde_json::from_slice(&std::fs::read(fixture("resize_cases.json")).unwrap()).unwrap();
    assert!(file.cases.len() >= 10, "the fixture covers many crop sizes");
    for case in file.cases {
        let src = load_rgb(&case.src);
        assert_eq!(src.dimensions(), (case.width, case.height));
        let resize = match case.mode.as_str() {
            "stretch" => ResizeMode::Stretch,
            "resize_then_center_crop" => {
                let crop = case.crop.expect("crop of a centre-crop case");
                assert_eq!((crop[0], crop[1]), (16, 16), "torchvision's centre offset");
                ResizeMode::ResizeThenCenterCrop {
                    ratio: case.ratio.expect("ratio"),
                }
            }
            other => panic!("unknown mode {other}"),
        };
        let mut pre = Preprocessor::new(InputGeometry {
            width: 224,
            height: 224,
            preprocess: Preprocess {
                color_order: ColorOrder::Rgb,
                scale: 1.0 / 255.0,
                mean: [0.0; 3],
                std: [1.0; 3],
                resize,
                filter: ResizeFilter::Bilinear,
            },
        });
        let mut out = vec![0u8; 224 * 224 * 3];
        pre.resize_into(&src, None, &mut out).unwrap();
        let expected = load_rgb(&case.expected);
        let close = out
            .chunks_exact(3)
            .zip(expected.as_raw().chunks_exact(3))
            .filter(|(a, b)| a.iter().zip(b.iter()).all(|(x, y)| x.abs_diff(*y) <= 1))
            .count();
        let share = close as f64 / (224.0 * 224.0);
        eprintln!(
            "{}: {:.4} of pixels within one grey level",
            case.expected, share
        );
        assert!(
            share >= 0.99,
            "{} ({}x{}, {}): only {:.4} of pixels within one grey level",
            case.expected,
            case.width,
            case.height,
            case.mode,
            share
        );
    }
}

#[test]
fn a_plain_bilinear_resize_would_fail_this_fixture() {
    // Guards the fixture itself: nearest-neighbour (no antialiasing) must
    // miss the 99% bar on the large downscale, or the test proves nothing.
    let src = load_rgb("resize_src_5.png");
    let mut pre = Preprocessor::new(InputGeometry {
        width: 224,
        height: 224,
        preprocess: Preprocess {
            color_order: ColorOrder::Rgb,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            resize: ResizeMode::Stretch,
            filter: ResizeFilter::Nearest,
        },
    });
    let mut out = vec![0u8; 224 * 224 * 3];
    pre.resize_into(&src, None, &mut out).unwrap();
    let expected = load_rgb("resize_5_stretch.png");
    let close = out
        .chunks_exact(3)
        .zip(expected.as_raw().chunks_exact(3))
        .filter(|(a, b)| a.iter().zip(b.iter()).all(|(x, y)| x.abs_diff(*y) <= 1))
        .count();
    assert!((close as f64) / (224.0 * 224.0) < 0.99);
}
