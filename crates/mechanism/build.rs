fn main() {
    protodino_torch_rpath::emit();
}
