"""Real upstream error bodies, as the providers send them (ids and key fragments redacted).

Sources: the providers' error docs and public bug reports quoting raw responses.
"""

from __future__ import annotations

# OpenAI 401: the message echoes a masked key, so it must never reach a reason.
OPENAI_INVALID_API_KEY = (
    b'{"error":{"message":"Incorrect API key provided: sk-VKMIs***************************************wjh3. '
    b'You can find your API key at https://platform.openai.com/account/api-keys.",'
    b'"type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'
)
OPENAI_RATE_LIMIT_EXCEEDED = (
    b'{"error":{"message":"Rate limit reached for gpt-4o in organization org-XXXXXXXXXXXXXXXXXXXXXXXX on tokens per '
    b"min (TPM): Limit 30000, Used 14567, Requested 24754. Please try again in 18.642s. Visit "
    b'https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,'
    b'"code":"rate_limit_exceeded"}}'
)
OPENAI_INSUFFICIENT_QUOTA = b"""{
  "error": {
    "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
    "type": "insufficient_quota",
    "param": null,
    "code": "insufficient_quota"
  }
}"""  # noqa: E501
OPENAI_CONTEXT_LENGTH_EXCEEDED = (
    b'{"error":{"message":"This model\'s maximum context length is 4097 tokens. However, your messages resulted '
    b'in 4294 tokens. Please reduce the length of the messages.","type":"invalid_request_error",'
    b'"param":"messages","code":"context_length_exceeded"}}'
)

ANTHROPIC_AUTHENTICATION_ERROR = (
    b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
)
ANTHROPIC_RATE_LIMIT_ERROR = (
    b'{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your account\'s rate '
    b'limit. Please try again later."},"request_id":"req_011CYwBRWF1xNRNtAVSzDAfR"}'
)
ANTHROPIC_OVERLOADED_ERROR = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
ANTHROPIC_PROMPT_TOO_LONG = (
    b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208656 tokens > '
    b'200000 maximum"},"request_id":"req_011CWdepJvA2D819tdYYq4h7"}'
)
ANTHROPIC_NOT_FOUND = (
    b'{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."}}'
)

GEMINI_API_KEY_INVALID = b"""{
  "error": {
    "code": 400,
    "message": "API key not valid. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {
          "service": "generativelanguage.googleapis.com"
        }
      },
      {
        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
        "locale": "en-US",
        "message": "API key not valid. Please pass a valid API key."
      }
    ]
  }
}
"""
GEMINI_API_KEY_NOT_FOUND = b"""{
  "error": {
    "code": 400,
    "message": "API Key not found. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {
          "service": "generativelanguage.googleapis.com"
        }
      }
    ]
  }
}
"""
# Only the ErrorInfo reason identifies the key problem here: the message was localised.
GEMINI_API_KEY_INVALID_REASON_ONLY = (
    b'{"error":{"code":400,"message":"Cl\\u00e9 API non valide.","status":"INVALID_ARGUMENT","details":[{"@type":'
    b'"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}'
)
GEMINI_RESOURCE_EXHAUSTED = b"""{
  "error": {
    "code": 429,
    "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    "status": "RESOURCE_EXHAUSTED",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
          {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count",
            "quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier",
            "quotaDimensions": {
              "location": "global",
              "model": "gemini-2.5-flash"
            },
            "quotaValue": "250000"
          }
        ]
      },
      {
        "@type": "type.googleapis.com/google.rpc.Help",
        "links": [
          {
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits"
          }
        ]
      },
      {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "26s"
      }
    ]
  }
}
"""  # noqa: E501
GEMINI_RESOURCE_EXHAUSTED_SHORT = b"""{
  "error": {
    "code": 429,
    "message": "Resource has been exhausted (e.g. check quota).",
    "status": "RESOURCE_EXHAUSTED"
  }
}
"""
GEMINI_INVALID_ARGUMENT = (
    b'{"error":{"code":400,"message":"* GenerateContentRequest.contents: contents is not specified\\n",'
    b'"status":"INVALID_ARGUMENT"}}'
)

AZURE_INVALID_SUBSCRIPTION_KEY = (
    b'{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. '
    b"Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for "
    b'your resource."}}'
)

OPENROUTER_NO_AUTH = b'{"error":{"message":"No auth credentials found","code":401}}'
OPENROUTER_USER_NOT_FOUND = b'{"error":{"message":"User not found.","code":401}}'
