//! Writes a target's seeds into a folder, for libFuzzer: `write_seeds TARGET DIR`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, target, dir] = args.as_slice() else {
        eprintln!("usage: write_seeds TARGET DIR");
        std::process::exit(2);
    };
    let mut seeds = taipan_fuzz::seeds::small(target);
    seeds.extend(taipan_fuzz::seeds::large(target));
    if seeds.is_empty() {
        eprintln!("unknown target {target}");
        std::process::exit(2);
    }
    std::fs::create_dir_all(dir).expect("creating the corpus folder");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(std::path::Path::new(dir).join(format!("seed-{i}")), s).expect("writing a seed");
    }
}
