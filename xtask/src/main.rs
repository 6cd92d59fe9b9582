fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("lab-hold") => {
            let mut lab = xtask::lab::Lab::two_hosts(cloison_dataplane::UplinkHook::Auto)?;
            lab.apply()?;
            println!("lab {} up", lab.tag);
            std::thread::sleep(std::time::Duration::from_secs(args.get(1).map(|s| s.parse().unwrap()).unwrap_or(60)));
            Ok(())
        }
        _ => anyhow::bail!("usage"),
    }
}
