#[allow(unused)]
fn _t() {}
