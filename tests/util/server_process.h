// A real `vtw-server` process on loopback for integration tests: started on free ports, its
// stdout and stderr captured to a log file, ready once grpc.health.v1 answers SERVING, killed
// (SIGKILL) when the object goes away. Not thread-safe: one owner per object.
//
// What it assumes about the server (change it here when the server changes):
//   - the binary is VTW_BINARY_DIR "/vtw-server";
//   - it takes `--model DIR --listen HOST:PORT --metrics-listen HOST:PORT --http-listen
//     HOST:PORT --threads N`; the
//     defaults below are added unless `extra_flags` already names the flag;
//   - it serves grpc.health.v1.Health and answers Check("") with SERVING once the model is loaded.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/security/credentials.h>

namespace vtw::testing {

class ServerProcess {
 public:
  // Starts the server with the default flags plus `extra_flags` and waits until it is SERVING
  // (VTW_TEST_SERVER_START_TIMEOUT seconds, default 60). On failure records a gtest failure that
  // says why (missing binary, early exit, timeout) with the tail of the server's log, and returns
  // nullptr: callers `ASSERT_NE(server, nullptr)`. `credentials` are the readiness health
  // check's (nullptr: plaintext), for servers started with TLS flags.
  static std::unique_ptr<ServerProcess> Start(
      const std::vector<std::string>& extra_flags = {},
      std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  // SIGKILL if still running. The log file is removed unless the current test failed.
  ~ServerProcess();

  std::string grpc_addr() const;     // "127.0.0.1:PORT"
  std::string metrics_addr() const;  // "127.0.0.1:PORT"; /metrics is served there
  int http_port() const { return http_port_; }  // the OpenAI-compatible HTTP front (127.0.0.1)
  int pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }
  // The last `lines` lines of the server's stdout + stderr.
  std::string LogTail(size_t lines = 40) const;

  // True while the process has not exited.
  bool Running();
  // Sends `sig` (no-op once the process is reaped).
  void Signal(int sig);
  // Waits for the process to end and returns its exit status, or 128 + signal number when a
  // signal ended it. Past `timeout_seconds` records a gtest failure, SIGKILLs it and returns -1.
  int Wait(double timeout_seconds = 120);

 private:
  ServerProcess() = default;
  // Reaps the process if it has ended (blocking or not); true when it has.
  bool Reap(bool block);

  pid_t pid_ = -1;
  int grpc_port_ = 0;
  int metrics_port_ = 0;
  int http_port_ = 0;
  std::string log_path_;
  bool exited_ = false;
  int exit_status_ = -1;
};

// Path of the built server binary.
std::string ServerBinary();

// The model the server serves in tests (tests/data/oracle/tiny-llava).
std::string TestModelDir();

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed).
int PickFreePort();

// grpc.health.v1.Health/Check("") once, with a fresh channel: "SERVING", "NOT_SERVING", or
// "error: <CODE>: <message>" when the RPC fails. `credentials` nullptr: plaintext.
std::string HealthStatus(const std::string& addr, double timeout_seconds = 1.0,
                         std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

}  // namespace vtw::testing
