#include "server/http_util.h"

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include <httplib.h>

namespace vtw {

StatusOr<HostPort> ParseListenAddress(const std::string& flag, const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgument(flag + " '" + address + "' must be host:port (e.g. 0.0.0.0:8080)");
  }
  HostPort hp;
  hp.host = address.substr(0, colon);
  if (hp.host.size() >= 2 && hp.host.front() == '[' && hp.host.back() == ']') {
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  }
  if (hp.host.empty()) hp.host = "0.0.0.0";
  const std::string port = address.substr(colon + 1);
  char* end = nullptr;
  const long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p < 0 || p > 65535) {
    return InvalidArgument(flag + " '" + address + "': the port must be 0..65535");
  }
  hp.port = static_cast<int>(p);
  return hp;
}

Status BindAndServe(httplib::Server& server, const std::string& flag, const std::string& address,
                    std::thread* thread, int* port) {
  VTW_ASSIGN_OR_RETURN(HostPort hp, ParseListenAddress(flag, address));
  errno = 0;
  int bound = -1;
  if (hp.port == 0) {
    bound = server.bind_to_any_port(hp.host);
  } else if (server.bind_to_port(hp.host, hp.port)) {
    bound = hp.port;
  }
  if (bound <= 0) {
    const int err = errno;
    return Status(StatusCode::kUnavailable,
                  "cannot listen on " + address + " (" + flag + ")" +
                      (err ? std::string(": ") + std::strerror(err) : std::string()));
  }
  *port = bound;
  *thread = std::thread([&server] { server.listen_after_bind(); });
  // httplib's stop() does nothing until the accept loop runs: wait for it, so that a Stop right
  // after Start (a model that fails to load) cannot leave the thread serving forever.
  while (!server.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return Status::Ok();
}

}  // namespace vtw
