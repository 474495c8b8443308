// Transport security and authentication of vtw-serve, for both ends of a connection:
//   - TLS / mTLS credentials from PEM files (server: certificate chain + key, optionally the CA
//     that must have signed client certificates; client: the CA to trust, optionally its own
//     certificate + key). Files are read and parsed up front, so a bad file is an error that
//     names it, before any socket is opened or model loaded.
//   - A bearer token (read from a file) and its check against the `authorization` metadata of a
//     call, in time that does not depend on how much of the token matched.
// Free functions and an immutable BearerTokenAuth: thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "model/status.h"

namespace vtw {

// The message of every UNAUTHENTICATED status the server returns.
inline constexpr char kUnauthenticatedMessage[] =
    "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'";

// Server-side TLS files (PEM). `cert` and `key` both or neither; `client_ca` needs them.
struct ServerTlsFiles {
  std::string cert;       // certificate chain, leaf first
  std::string key;        // private key of the leaf
  std::string client_ca;  // when set: clients must present a certificate signed by it (mTLS)
  bool enabled() const { return !cert.empty() || !key.empty() || !client_ca.empty(); }
};

// InsecureServerCredentials when no file is named; otherwise SSL credentials (with mTLS:
// GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY). INVALID_ARGUMENT for a wrong
// combination; NOT_FOUND / INVALID_ARGUMENT naming the flag and the file when one cannot be read,
// holds no PEM object of the expected kind, or the key does not belong to the certificate.
StatusOr<std::shared_ptr<grpc::ServerCredentials>> BuildServerCredentials(
    const ServerTlsFiles& files);

// Client-side TLS files (PEM). `ca` enables TLS; `cert` + `key` (both or neither) add a client
// certificate for mTLS and need `ca`.
struct ClientTlsFiles {
  std::string ca;
  std::string cert;
  std::string key;
  bool enabled() const { return !ca.empty() || !cert.empty() || !key.empty(); }
};

// InsecureChannelCredentials when no file is named, else SslCredentials; errors as above.
// `flag_prefix` names the flags in messages ("--tls-" gives "--tls-ca", "--tls-cert", ...).
StatusOr<std::shared_ptr<grpc::ChannelCredentials>> BuildChannelCredentials(
    const ClientTlsFiles& files, const std::string& flag_prefix = "--tls-");

// The token in `path`: the file's content with trailing whitespace (spaces, tabs, CR, LF)
// removed. Errors name `flag` and the file: unreadable, empty, or characters that cannot travel
// in a gRPC metadata value after "Bearer " (anything but printable ASCII without spaces).
StatusOr<std::string> ReadTokenFile(const std::string& flag, const std::string& path);

// The same checks for a token that comes from somewhere else (an environment variable).
Status ValidateToken(const std::string& source, const std::string& token);

// True when `a` and `b` are equal. Compares SHA-256 digests with CRYPTO_memcmp, so the time
// depends on neither the position of the first difference nor the length of the expected value.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// Checks `authorization: Bearer <token>` metadata against one expected token.
class BearerTokenAuth {
 public:
  explicit BearerTokenAuth(const std::string& token);

  // True when the call carries `authorization` metadata "Bearer <token>" (scheme
  // case-insensitive, one or more spaces after it) with the expected token.
  bool Check(const grpc::ServerContextBase& context) const;
  // The same for a metadata value ("" when the call has none).
  bool CheckHeader(std::string_view authorization) const;

 private:
  std::array<uint8_t, 32> digest_;  // SHA-256 of the token; the token itself is not kept
};

}  // namespace vtw
