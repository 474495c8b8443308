#include "tests/util/test_server.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sstream>
#include <stdexcept>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/health_check_service_interface.h>

#include "tests/util/oracle.h"
#include "tests/util/test_bundles.h"

#include <spdlog/spdlog.h>

namespace vtw::testing {

TestServer::TestServer(std::unique_ptr<ModelBundle> bundle, EngineOptions engine,
                       ServiceLimits limits)
    : bundle_(std::move(bundle)), metrics_http_(metrics_.registry()) {
  spdlog::set_level(spdlog::level::warn);  // no access log lines in test output
  if (!metrics_http_.Start("127.0.0.1:0").ok()) throw std::runtime_error("metrics port");
  intake_ = std::make_unique<RequestIntake>(limits, &metrics_);
  service_ = std::make_unique<InferenceServiceImpl>(*intake_);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(limits.image.max_bytes));
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) throw std::runtime_error("cannot start the test gRPC server");
  server_->GetHealthCheckService()->SetServingStatus(false);
  engine_ = std::make_unique<Engine>(*bundle_, engine, &metrics_);
  intake_->SetEngine(bundle_.get(), engine_.get());
  server_->GetHealthCheckService()->SetServingStatus(true);
  channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                 grpc::InsecureChannelCredentials());
}

TestServer::~TestServer() {
  engine_->Stop(Status(StatusCode::kUnavailable, "test server stopping"));
  intake_->ClearEngine();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  engine_.reset();
}

std::unique_ptr<v1::InferenceService::Stub> TestServer::Stub() const {
  return v1::InferenceService::NewStub(channel_);
}

std::string TestServer::HealthStatus() const {
  // grpc.health.v1.Health/Check with an empty HealthCheckRequest; the response is
  // HealthCheckResponse{status = 1 (SERVING) | 2 (NOT_SERVING)}, decoded by hand.
  grpc::GenericStub stub(channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::ByteBuffer request, response;
  grpc::Slice empty;
  request = grpc::ByteBuffer(&empty, 1);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = s;
                   done = true;
                   cv.notify_one();
                 });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  if (!status.ok()) return "ERROR " + status.error_message();
  std::vector<grpc::Slice> slices;
  response.Dump(&slices);
  std::string bytes;
  for (auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  if (bytes.size() == 2 && bytes[0] == 0x08) return bytes[1] == 1 ? "SERVING" : "NOT_SERVING";
  if (bytes.empty()) return "UNKNOWN";
  return "UNPARSED";
}

std::string ScrapeMetrics(int port) { return HttpGet(port, "/metrics"); }

std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string req =
      "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[8192];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, n);
  close(fd);
  const size_t body = out.find("\r\n\r\n");
  return body == std::string::npos ? "" : out.substr(body + 4);
}

double MetricValue(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  }
  return -1;
}

}  // namespace vtw::testing
