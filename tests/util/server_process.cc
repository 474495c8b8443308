#include "tests/util/server_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "cli/health_check.h"

namespace vtw::testing {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

bool HasFlag(const std::vector<std::string>& flags, const std::string& name) {
  for (const std::string& f : flags) {
    if (f == name || f.rfind(name + "=", 0) == 0) return true;
  }
  return false;
}

// The server's command line: the defaults the harness needs, then `extra_flags`.
std::vector<std::string> ServerArgv(int grpc_port, int metrics_port, int http_port,
                                    const std::vector<std::string>& extra_flags) {
  std::vector<std::string> argv = {ServerBinary()};
  auto add_default = [&](const std::string& flag, const std::string& value) {
    if (HasFlag(extra_flags, flag)) return;
    argv.push_back(flag);
    argv.push_back(value);
  };
  add_default("--model", TestModelDir());
  add_default("--listen", "127.0.0.1:" + std::to_string(grpc_port));
  add_default("--metrics-listen", "127.0.0.1:" + std::to_string(metrics_port));
  add_default("--http-listen", "127.0.0.1:" + std::to_string(http_port));
  add_default("--threads", "1");
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  return argv;
}

double StartTimeoutSeconds() {
  const char* env = std::getenv("VTW_TEST_SERVER_START_TIMEOUT");
  return env && std::atof(env) > 0 ? std::atof(env) : 60.0;
}

std::string JoinArgv(const std::vector<std::string>& argv) {
  std::string out;
  for (const std::string& a : argv) out += (out.empty() ? "" : " ") + a;
  return out;
}

std::string LowerCase(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string ReadTail(const std::string& path, size_t lines) {
  std::ifstream in(path, std::ios::binary);
  std::vector<std::string> all;
  for (std::string line; std::getline(in, line);) all.push_back(line);
  std::string out;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    out += all[i] + "\n";
  }
  return out;
}

}  // namespace

std::string ServerBinary() { return std::string(VTW_BINARY_DIR) + "/vtw-server"; }

std::string TestModelDir() { return std::string(VTW_TEST_DATA_DIR) + "/oracle/tiny-llava"; }

int PickFreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

std::string HealthStatus(const std::string& addr, double timeout_seconds,
                         std::shared_ptr<grpc::ChannelCredentials> credentials) {
  // A fresh channel with short reconnect backoff and its own subchannel pool, so that a refused
  // connection a moment ago does not delay this check.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto channel = grpc::CreateCustomChannel(
      addr, credentials ? credentials : grpc::InsecureChannelCredentials(), args);
  tools::ServingStatus serving = tools::ServingStatus::kUnknown;
  grpc::Status status = tools::CheckHealth(channel, "", timeout_seconds, &serving);
  if (!status.ok()) {
    return std::string("error: ") + tools::GrpcCodeName(status.error_code()) + ": " +
           status.error_message();
  }
  return tools::ServingStatusName(serving);
}

std::unique_ptr<ServerProcess> ServerProcess::Start(
    const std::vector<std::string>& extra_flags,
    std::shared_ptr<grpc::ChannelCredentials> credentials) {
  static std::atomic<int> counter{0};
  const std::string binary = ServerBinary();
  if (!fs::exists(binary)) {
    ADD_FAILURE() << "the server binary " << binary
                  << " does not exist: build the vtw-server target before running this test";
    return nullptr;
  }
  const double timeout = StartTimeoutSeconds();
  constexpr int kAttempts = 3;  // a port picked free may be taken before the server binds it
  for (int attempt = 1; attempt <= kAttempts; ++attempt) {
    std::unique_ptr<ServerProcess> p(new ServerProcess());
    p->grpc_port_ = PickFreePort();
    do {
      p->metrics_port_ = PickFreePort();
    } while (p->metrics_port_ == p->grpc_port_);
    do {
      p->http_port_ = PickFreePort();
    } while (p->http_port_ == p->grpc_port_ || p->http_port_ == p->metrics_port_);
    if (p->grpc_port_ == 0 || p->metrics_port_ == 0 || p->http_port_ == 0) {
      ADD_FAILURE() << "cannot find a free TCP port on 127.0.0.1";
      return nullptr;
    }
    p->log_path_ = (fs::path(::testing::TempDir()) /
                    ("vtw_server_" + std::to_string(getpid()) + "_" +
                     std::to_string(counter++) + ".log"))
                       .string();
    const std::vector<std::string> argv = ServerArgv(p->grpc_port_, p->metrics_port_, p->http_port_, extra_flags);

    // Everything the child needs is prepared before fork: after it, only async-signal-safe calls.
    const int log_fd = open(p->log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (log_fd < 0 || null_fd < 0) {
      ADD_FAILURE() << "cannot create the server log " << p->log_path_;
      return nullptr;
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test (if the test thread dies)
      if (getppid() != parent) _exit(127);
      dup2(null_fd, 0);
      dup2(log_fd, 1);
      dup2(log_fd, 2);
      execv(args[0], args.data());
      static const char kMsg[] = "exec of the server binary failed\n";
      (void)!write(2, kMsg, sizeof(kMsg) - 1);
      _exit(127);
    }
    close(log_fd);
    close(null_fd);
    if (pid < 0) {
      ADD_FAILURE() << "fork failed";
      return nullptr;
    }
    p->pid_ = pid;

    const auto deadline = Clock::now() + std::chrono::duration<double>(timeout);
    std::string last_health = "not checked";
    while (Clock::now() < deadline) {
      if (p->Reap(/*block=*/false)) break;
      last_health = HealthStatus(p->grpc_addr(), 1.0, credentials);
      if (last_health == "SERVING") return p;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    const std::string tail = p->LogTail(60);
    if (p->exited_) {
      const std::string log = LowerCase(tail);
      const bool port_taken = log.find("address already in use") != std::string::npos ||
                              log.find("cannot listen") != std::string::npos ||
                              log.find("cannot serve metrics") != std::string::npos ||
                              log.find("cannot serve http") != std::string::npos;
      if (port_taken && attempt < kAttempts) continue;
      ADD_FAILURE() << "vtw-server exited with status " << p->exit_status_
                    << " before it was SERVING.\ncommand: " << JoinArgv(argv) << "\nlog "
                    << p->log_path_ << " (tail):\n"
                    << tail;
      return nullptr;
    }
    ADD_FAILURE() << "vtw-server was not SERVING within " << timeout
                  << " s (last health check: " << last_health << ").\ncommand: " << JoinArgv(argv)
                  << "\nlog " << p->log_path_ << " (tail):\n"
                  << tail;
    return nullptr;  // the destructor kills it
  }
  return nullptr;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0 && !Reap(false)) {
    kill(pid_, SIGKILL);
    Reap(true);
  }
  if (!log_path_.empty() && !::testing::Test::HasFailure()) {
    std::error_code ec;
    fs::remove(log_path_, ec);
  }
}

std::string ServerProcess::grpc_addr() const {
  return "127.0.0.1:" + std::to_string(grpc_port_);
}

std::string ServerProcess::metrics_addr() const {
  return "127.0.0.1:" + std::to_string(metrics_port_);
}

std::string ServerProcess::LogTail(size_t lines) const { return ReadTail(log_path_, lines); }

bool ServerProcess::Reap(bool block) {
  if (exited_) return true;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, block ? 0 : WNOHANG);
  if (r != pid_) return false;
  exited_ = true;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return true;
}

bool ServerProcess::Running() { return !Reap(false); }

void ServerProcess::Signal(int sig) {
  if (!Reap(false)) kill(pid_, sig);
}

int ServerProcess::Wait(double timeout_seconds) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_seconds);
  while (!Reap(false)) {
    if (Clock::now() >= deadline) {
      ADD_FAILURE() << "vtw-server (pid " << pid_ << ") did not exit within " << timeout_seconds
                    << " s; killing it. Log tail:\n"
                    << LogTail();
      kill(pid_, SIGKILL);
      Reap(true);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return exit_status_;
}

}  // namespace vtw::testing
