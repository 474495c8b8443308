// Small pieces shared by the two HTTP servers on cpp-httplib (server/openai_http.h,
// server/metrics_http.h): the listen address, and the bind-then-serve-on-a-thread start.
#pragma once

#include <string>
#include <thread>

#include "model/status.h"

namespace httplib {
class Server;
}

namespace vtw {

struct HostPort {
  std::string host;  // "" or "0.0.0.0": every IPv4 address; "[::]" is given as "::"
  int port = 0;
};

// "host:port" or "[v6]:port" (port 0..65535); INVALID_ARGUMENT naming `flag` otherwise.
StatusOr<HostPort> ParseListenAddress(const std::string& flag, const std::string& address);

// Binds `server` to `address` (`flag` names it in errors) and runs it on *thread; sets *port
// to the bound port; returns once the server accepts (so that stop() takes effect). UNAVAILABLE
// when the address cannot be bound.
Status BindAndServe(httplib::Server& server, const std::string& flag, const std::string& address,
                    std::thread* thread, int* port);

}  // namespace vtw
