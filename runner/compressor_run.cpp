// compressor-run: load a bundle's AOTInductor package (.pt2) through libtorch, run it on
// the bundle's recorded sample inputs, and print one JSON line of latency figures.
//
//   compressor-run BUNDLE_DIR [--iters N] [--warmup N] [--threads N]
//
// BUNDLE_DIR/manifest.json names the package (artifacts.aoti); the sample inputs are
// raw little-endian tensors described by <package dir>/runner_inputs.txt, one line per
// input in call order: "name dtype ndim dim0 dim1 ... file" (dtype: int64, int32,
// float32). Output: {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput", ...}
// where throughput is batch items (first dimension of the first input) per second.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string bundle;
  int iters = 50;
  int warmup = 5;
  int threads = 0;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "compressor-run: " << why << "\n"
            << "usage: compressor-run BUNDLE_DIR [--iters N] [--warmup N] [--threads N]\n";
  std::exit(2);
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) {
      if (i + 1 >= argc) usage(std::string(name) + " needs a value");
      try {
        return std::stoi(argv[++i]);
      } catch (const std::exception&) {
        usage(std::string(name) + " needs an integer, got '" + argv[i] + "'");
      }
    };
    if (a == "--iters") o.iters = value("--iters");
    else if (a == "--warmup") o.warmup = value("--warmup");
    else if (a == "--threads") o.threads = value("--threads");
    else if (!a.empty() && a[0] == '-') usage("unknown option " + a);
    else if (o.bundle.empty()) o.bundle = a;
    else usage("one bundle directory expected, got a second: " + a);
  }
  if (o.bundle.empty()) usage("no bundle directory given");
  if (o.iters < 1 || o.warmup < 0) usage("--iters must be >= 1 and --warmup >= 0");
  return o;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The value of "aoti" in manifest.json's artifacts: a plain relative path (the bundle
// writer never escapes characters in artifact paths).
std::string aoti_artifact(const std::string& manifest) {
  const std::string key = "\"aoti\"";
  auto at = manifest.find(key);
  if (at == std::string::npos)
    throw std::runtime_error("manifest.json has no artifacts.aoti: compile with the aoti export");
  auto open = manifest.find('"', manifest.find(':', at + key.size()) + 1);
  auto close = manifest.find('"', open + 1);
  if (open == std::string::npos || close == std::string::npos)
    throw std::runtime_error("manifest.json: artifacts.aoti is not a string");
  return manifest.substr(open + 1, close - open - 1);
}

torch::Dtype parse_dtype(const std::string& name) {
  if (name == "int64") return torch::kInt64;
  if (name == "int32") return torch::kInt32;
  if (name == "float32") return torch::kFloat32;
  throw std::runtime_error("runner_inputs.txt: unsupported dtype " + name);
}

std::vector<torch::Tensor> load_inputs(const std::string& dir) {
  std::ifstream spec(dir + "/runner_inputs.txt");
  if (!spec) throw std::runtime_error("no runner_inputs.txt next to the package in " + dir);
  std::vector<torch::Tensor> inputs;
  std::string line;
  while (std::getline(spec, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    std::string name, dtype, file;
    int ndim = 0;
    in >> name >> dtype >> ndim;
    std::vector<int64_t> shape(ndim);
    for (auto& d : shape) in >> d;
    in >> file;
    if (!in) throw std::runtime_error("runner_inputs.txt: malformed line: " + line);
    auto t = torch::empty(shape, torch::TensorOptions().dtype(parse_dtype(dtype)));
    std::string bytes = read_file(dir + "/" + file);
    if (bytes.size() != static_cast<size_t>(t.nbytes()))
      throw std::runtime_error(file + ": " + std::to_string(bytes.size()) + " bytes, expected " +
                               std::to_string(t.nbytes()));
    std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    inputs.push_back(t);
  }
  if (inputs.empty()) throw std::runtime_error("runner_inputs.txt lists no inputs");
  return inputs;
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  double pos = q * static_cast<double>(v.size() - 1);
  auto lo = static_cast<size_t>(pos);
  size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  try {
    if (o.threads > 0) torch::set_num_threads(o.threads);
    std::string package = o.bundle + "/" + aoti_artifact(read_file(o.bundle + "/manifest.json"));
    std::string package_dir = package.substr(0, package.find_last_of('/'));
    std::vector<torch::Tensor> inputs = load_inputs(package_dir);
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(package);
    std::vector<torch::Tensor> out;
    for (int i = 0; i < o.warmup; ++i) out = loader.run(inputs);
    std::vector<double> ms;
    ms.reserve(o.iters);
    for (int i = 0; i < o.iters; ++i) {
      auto start = std::chrono::steady_clock::now();
      out = loader.run(inputs);
      auto stop = std::chrono::steady_clock::now();
      ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    }
    double mean = 0;
    for (double m : ms) mean += m;
    mean /= static_cast<double>(ms.size());
    double p50 = percentile(ms, 0.5);
    int64_t batch = inputs[0].dim() > 0 ? inputs[0].size(0) : 1;
    std::printf(
        "{\"package\": \"%s\", \"iters\": %d, \"batch\": %lld, \"p50_ms\": %.6f, \"p90_ms\": %.6f, "
        "\"p99_ms\": %.6f, \"mean_ms\": %.6f, \"throughput\": %.3f, \"threads\": %d, "
        "\"outputs\": %zu, \"output0_sum\": %.6g}\n",
        package.c_str(), o.iters, static_cast<long long>(batch), p50, percentile(ms, 0.9),
        percentile(ms, 0.99), mean, 1000.0 * static_cast<double>(batch) / p50,
        torch::get_num_threads(), out.size(), out.empty() ? 0.0 : out[0].sum().item<double>());
  } catch (const std::exception& e) {
    std::cerr << "compressor-run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
