"""Provider connectors (Twilio, Termii, SendGrid, Mailgun, FCM, APNs) and the provider simulator."""
